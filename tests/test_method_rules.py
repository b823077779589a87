"""Rules without a server: what `auto` picks and why, what it tries next, what every
method says about itself, and which points retention removes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

from lib.errors import ConfigError
from lib.points import retention as retention_rules
from lib.points.catalog import Point
from lib.points.manifest import Kind, Manifest, Status
from lib.points.methods import registry
from lib.points.methods.base import REPOSITORY, SWAP, TABLES, Method

pytestmark = pytest.mark.unit


def _target(*, can_create_db: bool, encrypt: bool = False):
    """What choose() reads of a target: the role's right to create databases and the settings."""
    return SimpleNamespace(
        facts=SimpleNamespace(can_create_db=can_create_db, current_user="migrator"),
        settings=SimpleNamespace(encrypt=encrypt),
    )


def test_auto_copies_on_the_server_where_the_role_may_create_databases_and_dumps_otherwise():
    method, why = registry.choose(_target(can_create_db=True), "auto")
    assert method.name == "template" and "may create databases" in why
    method, why = registry.choose(_target(can_create_db=False), "auto")
    assert method.name == "dump" and "may not create databases" in why


def test_encryption_turns_auto_into_a_dump_and_refuses_a_template_point():
    method, why = registry.choose(_target(can_create_db=True, encrypt=True), "auto")
    assert method.name == "dump" and "encryption" in why
    with pytest.raises(ConfigError, match="cannot encrypt"):
        registry.choose(_target(can_create_db=True, encrypt=True), "template")
    assert registry.choose(_target(can_create_db=False, encrypt=True), "data")[0].name == "data"


@pytest.mark.parametrize("name", ["template", "dump", "data", "pitr"])
def test_a_method_asked_for_is_taken_as_asked(name):
    method, why = registry.choose(_target(can_create_db=False), name)
    assert (method.name, why) == (name, "asked for")


def test_auto_falls_back_template_then_dump_then_data_and_no_further():
    chain, method = [], registry.get("template")
    while method is not None:
        chain.append(method.name)
        method = registry.fallback(method)
    assert chain == ["template", "dump", "data"]
    assert registry.fallback(registry.get("pitr")) is None


def test_unknown_names_are_refused_with_the_names_there_are():
    with pytest.raises(ConfigError, match="Unknown method 'tape'") as raised:
        registry.get("tape")
    assert "auto, template, dump, data, pitr" in raised.value.hint
    with pytest.raises(ConfigError, match="ROLLBACK_METHOD='tape' is not a method"):
        registry.check_name("tape", setting="ROLLBACK_METHOD")
    assert registry.check_name("auto") == "auto"
    assert registry.find("tape") is None


def test_every_method_says_how_it_is_restored_and_what_its_points_guarantee():
    facts = {
        name: (m.restore_mode, m.level, m.holds_database, m.whole_database, m.can_restore_in_place())
        for name, m in registry.METHODS.items()
    }
    assert facts == {
        "template": (SWAP, "catalog", True, True, False),
        "dump": (SWAP, "counted", False, True, True),
        "data": (TABLES, "counted", False, False, False),
        "pitr": (REPOSITORY, "repository", False, True, False),
    }
    assert all(isinstance(m, Method) and m.name == name for name, m in registry.METHODS.items())
    assert ("auto", *registry.METHODS) == registry.NAMES
    assert registry.FOR_TABLES in registry.METHODS and not registry.METHODS[registry.FOR_TABLES].whole_database


# ---------------------------------------------------------------- retention


NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def _point(n: int, days_old: float, kind: Kind = Kind.MANUAL, migration_id: str | None = None) -> Point:
    created = (NOW - timedelta(days=days_old)).isoformat(timespec="milliseconds")
    manifest = Manifest(
        id=f"rb_p{n}", method="dump", kind=kind, status=Status.COMPLETED, created_at_text=created, migration_id=migration_id
    )
    return Point(Path(f"/nonexistent/rb_p{n}"), manifest)


def test_keep_with_a_migration_id_counts_and_removes_only_that_migrations_points():
    """The guide's example `--migration-id client_migration --keep 5` once removed the demo's
    and other migrations' points and counted states kept before rollbacks among the five."""
    points = [_point(n, 20 - n, migration_id="client_migration") for n in range(7)]
    points += [_point(10 + n, 15 - n, migration_id="other") for n in range(3)]  # another migration's
    points += [_point(20, 12), _point(21, 1, Kind.BEFORE_ROLLBACK), _point(22, 0.5, Kind.BEFORE_ROLLBACK)]
    points.sort(key=lambda p: p.created_at)
    plan = retention_rules.plan_cleanup(
        points, lambda p: True, keep=5, older_than_days=None, now=NOW, migration_id="client_migration"
    )
    assert [p.id for p in plan.remove] == ["rb_p0", "rb_p1"]
    assert plan.why["rb_p0"] == "beyond the newest 5 points of migration client_migration"
    everything = retention_rules.plan_cleanup(points, lambda p: True, keep=2, older_than_days=None, now=NOW)
    assert not {p.id for p in everything.remove} & {"rb_p21", "rb_p22"}  # states before rollbacks: KEEP_BEFORE_STATES


def _plan(points, good_ids, **retention):
    plan = retention_rules.plan_cleanup(points, lambda p: p.id in good_ids, now=NOW, **retention)
    return [p.id for p in plan.remove], plan.protected and plan.protected.id, plan.protected_manual and plan.protected_manual.id


def test_keep_n_removes_the_oldest_beyond_the_newest_n():
    points = [_point(n, days_old=10 - n) for n in range(6)]  # oldest first
    assert _plan(points, {p.id for p in points}, keep=2, older_than_days=None) == (
        ["rb_p0", "rb_p1", "rb_p2", "rb_p3"],
        "rb_p5",
        "rb_p5",
    )


def test_the_newest_point_that_verifies_is_kept_whatever_keep_says():
    points = [_point(n, days_old=10 - n) for n in range(4)]
    removed, protected, _ = _plan(points, {"rb_p1"}, keep=1, older_than_days=None)  # only p1 verifies
    assert protected == "rb_p1" and "rb_p1" not in removed and removed == ["rb_p0", "rb_p2"]


def test_quick_rollbacks_target_is_kept_beside_a_newer_state_kept_before_a_rollback():
    points = [_point(0, 5), _point(1, 4), _point(2, 1, Kind.BEFORE_ROLLBACK)]
    removed, protected, manual = _plan(points, {p.id for p in points}, keep=1, older_than_days=None)
    assert (protected, manual) == ("rb_p2", "rb_p1") and removed == ["rb_p0"]


def test_older_than_removes_only_what_is_older_and_both_rules_must_agree():
    points = [_point(n, days_old=d) for n, d in enumerate([30, 20, 8, 6, 1])]
    everyone = {p.id for p in points}
    assert _plan(points, everyone, keep=None, older_than_days=7)[0] == ["rb_p0", "rb_p1", "rb_p2"]
    assert _plan(points, everyone, keep=4, older_than_days=7)[0] == ["rb_p0"]  # beyond the newest 4 and older than 7 days
    assert _plan(points, everyone, keep=None, older_than_days=0)[0] == ["rb_p0", "rb_p1", "rb_p2", "rb_p3"]


@pytest.mark.parametrize("keep, older, message", [(0, None, "--keep must be at least 1"), (None, -1.0, "--older-than must be")])
def test_a_retention_that_makes_no_sense_is_refused(keep, older, message):
    with pytest.raises(ConfigError, match=message):
        retention_rules.check_retention_request(keep, older)


# ---------------------------------------------------------------- a sealed database's mark


def test_a_seal_mark_reads_back_what_was_written_after_the_points_own_text():
    from lib.points.copies import SealMark

    head = "rollback point rb_x: Before [migration]; (managed by rollback_manager.py, catalog 1; do not connect)"
    for mark in (
        SealMark(),
        SealMark(stamp="754"),
        SealMark(stamp="754", open="760/12/2"),
        SealMark(stamp="9", changed="resealed", interrupted=True, ready="2026-12-06T22:00:00+00:00"),
    ):
        assert SealMark.split(head + mark.text()) == (head, mark)
    assert SealMark.split(None) == ("", SealMark())
    assert SealMark.split("a comment of someone else [not ours]") == ("a comment of someone else [not ours]", SealMark())


def test_a_seal_mark_counts_the_readers_that_joined_an_opening():
    from lib.points.copies import SealMark

    opened = SealMark(stamp="5", open="7/40/0")
    assert opened.joined().joined().opening() == ("7", 40, 2)
    assert SealMark(changed="open").why_changed().startswith("it was found open")
    assert not SealMark(changed="session").trusted() and SealMark(interrupted=True).trusted()


def test_rows_of_an_unlogged_table_emptied_by_recovery_are_no_difference_and_any_other_is():
    from lib.points.reading import Reading

    baseline = {"public.orders": 3, "public.scratch": 50}, {"public.orders": "3:99", "public.scratch": "50:7"}
    after_crash = Reading({"public.orders": 3, "public.scratch": 0}, {"public.orders": "3:99", "public.scratch": "0:0"})
    assert after_crash.differences(*baseline, unlogged={"public.scratch"}) == []
    assert after_crash.emptied(baseline[0], {"public.scratch"}) == ["public.scratch"]
    assert after_crash.differences(*baseline)  # a logged table emptied is a difference
    changed = Reading({"public.orders": 3, "public.scratch": 50}, {"public.orders": "3:98", "public.scratch": "50:7"})
    assert changed.differences(*baseline, unlogged={"public.scratch"}) == [
        "public.orders: the rows' content differs from what was read before"
    ]
