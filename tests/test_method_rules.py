"""The rules of choosing a method, without a server: what `auto` picks and why, what
it tries next, and what every method says about itself."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lib.errors import ConfigError
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
        "template": (SWAP, "physical", True, True, False),
        "dump": (SWAP, "deep", False, True, True),
        "data": (TABLES, "deep", False, False, False),
        "pitr": (REPOSITORY, "repository", False, True, False),
    }
    assert all(isinstance(m, Method) and m.name == name for name, m in registry.METHODS.items())
    assert ("auto", *registry.METHODS) == registry.NAMES
    assert registry.FOR_TABLES in registry.METHODS and not registry.METHODS[registry.FOR_TABLES].whole_database
