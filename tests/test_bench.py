"""The benchmarks keep working (tiny sizes, no DSLR): every figure they print is
measured, and each target of the scale benchmark gets a verdict that agrees with its
figures. Whether a target is met at these sizes is for people, not asserted."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def _bench(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """One benchmark script, run as a person would, without a terminal; it must succeed."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# The scale benchmark's targets per filesystem, and where each figure is in a size's figures.
FIGURES = {
    "template point (s)": lambda f: f["seconds"]["template point"],
    "template point − server copy (s)": lambda f: f["template point - server copy"],
    "template point / DSLR snapshot": lambda f: f["ratios"]["template point / DSLR snapshot"],
    "quick rollback (s)": lambda f: f["seconds"]["quick rollback"],
    "quick rollback / DSLR restore": lambda f: f["ratios"]["quick rollback / DSLR restore"],
    "staging unavailable (s)": lambda f: f["seconds"]["staging unavailable"],
    "dump point / pg_dump -Fc": lambda f: f["ratios"]["dump point / pg_dump -Fc"],
    "dump point size / pg_dump size": lambda f: f["ratios"]["dump point size / pg_dump size"],
    "dump point restore / pg_restore": lambda f: f["ratios"]["dump point restore / pg_restore"],
    "spare ready / pg_dump read": lambda f: f["ratios"]["spare ready / pg_dump read"],
    "point under background, slowest (s)": lambda f: f["seconds"]["point under background"],
}
EVERYWHERE = {
    "quick rollback / DSLR restore",
    "staging unavailable (s)",
    "spare ready / pg_dump read",
    *(k for k in FIGURES if k.startswith("dump point")),
}
TARGETS = {
    "ordinary": {"template point − server copy (s)", *EVERYWHERE},
    "xfs": {
        "template point (s)",
        "template point / DSLR snapshot",
        "quick rollback (s)",
        "point under background, slowest (s)",
        *EVERYWHERE,
    },
}
NOT_MEASURED_WITHOUT_DSLR = {"template point / DSLR snapshot", "quick rollback / DSLR restore"}


def _verdicts_agree_with_the_figures(place: str, fs: dict) -> None:
    """One verdict per target of ``place``; without DSLR its comparisons are not measured
    (None); every other is met (True) exactly when no size's figure is over the limit
    its target states, and a miss names those sizes."""
    assert sorted(c["figure"] for c in fs["checks"]) == sorted(TARGETS[place]), place
    for check in fs["checks"]:
        figure, met, missed = check["figure"], check["met"], check["missed"]
        if figure in NOT_MEASURED_WITHOUT_DSLR:
            assert met is None and missed == [], (place, check)
            continue
        assert isinstance(met, bool) and isinstance(missed, list), (place, check)
        limit = float(re.match(r"≤ (\d+(?:\.\d+)?)", check["target"]).group(1))
        values = {size: FIGURES[figure](fig) for size, fig in fs["sizes"].items()}
        assert all(isinstance(v, int | float) for v in values.values()), (place, figure, values)
        over = [f"{size} GB" for size, value in values.items() if value > limit]
        assert [m for m in missed if m.endswith(" GB")] == over, (place, check, values)
        growth = [m for m in missed if not m.endswith(" GB")]
        if growth:  # the one other way to miss: the largest size's time over the smallest's
            name = figure.removesuffix(" (s)")
            assert growth == [f"growth {fs['growth'][name]:.2f}x"] and "growth ≤" in check["target"], (place, check)
        assert met is (not missed), (place, check)


def test_benchmark_runs_end_to_end_on_a_small_database():
    result = _bench("bench_rollback.py", "--size-mb", "20", "--no-dslr", "--json")
    figures = json.loads(result.stdout[result.stdout.index("{") :])
    seconds = figures["seconds"]
    for key in ("pg_dump -Fc", "pg_restore", "dump point", "template point", "quick rollback", "staging unavailable"):
        assert seconds[key] > 0, key
    assert figures["size_bytes"] >= 20 * 1024 * 1024
    assert "template point" in result.stderr and "ratio" in result.stderr


def test_migration_benchmark_runs_end_to_end_on_a_small_sample():
    result = _bench("bench_migration.py", "--clients", "500", "--json")
    figures = json.loads(result.stdout)
    # every variant migrated the same records (the script checks it and fails otherwise)
    assert {(r["migrated"], r["failed"]) for r in figures["results"].values()} == {(500 + 10 - 20 - 10, 30)}
    assert "baseline+" in result.stderr and "peak RSS" in result.stderr


def test_scale_benchmark_measures_both_sizes_on_each_filesystem():
    result = _bench("bench_scale.py", "--sizes-gb", "0.02,0.04", "--no-dslr", "--migration-seconds", "2", "--json")
    figures = json.loads(result.stdout)
    assert figures["sizes_gb"] == [0.02, 0.04]
    places = ["ordinary", "xfs"] if os.geteuid() == 0 else ["ordinary"]  # the XFS loop mount needs root
    for place in places:
        fs = figures["filesystems"][place]
        assert fs["available"] and not fs["errors"], (place, fs.get("reason"), fs.get("errors"))
        assert list(fs["sizes"]) == ["0.02", "0.04"], place
        for label, size in fs["sizes"].items():
            seconds = size["seconds"]
            for key in ("server copy", "template point", "quick rollback", "pg_dump -Fc", "dump point"):
                assert seconds[key] > 0, (place, label, key)
            assert seconds["staging unavailable"] >= 0, (place, label)
            assert seconds["spare ready after migration"] >= 0 and seconds["background work after migration"] >= 0
            assert seconds["DSLR snapshot"] is None and seconds["DSLR restore"] is None  # --no-dslr
            assert size["bytes"]["pg_dump -Fc"] > 0 and size["bytes"]["dump point"] > 0, (place, label)
            assert size["ratios"]["dump point / pg_dump -Fc"] > 0 and size["ratios"]["dump point size / pg_dump size"] > 0
            assert size["copy"] is not None and size["quick rollback details"]["tool"], (place, label)
        assert fs["sizes"]["0.04"]["staging_bytes"] > fs["sizes"]["0.02"]["staging_bytes"] >= 20 * 1024 * 1024
        assert fs["growth"]["template point"] > 0 and fs["growth"]["quick rollback"] > 0, place
        _verdicts_agree_with_the_figures(place, fs)
        assert not Path(fs["server_dir"]).exists(), f"{place}: the server's folder was left behind"
    if os.geteuid() == 0:
        xfs = figures["filesystems"]["xfs"]
        assert xfs["fstype"] == "xfs"
        assert all(size["seconds"]["server copy (clone)"] > 0 for size in xfs["sizes"].values())
        assert xfs["mount"] not in Path("/proc/mounts").read_text() and not Path(xfs["image"]).exists()
    assert "quick rollback" in result.stderr and "larger/smaller" in result.stderr
    verdicts = [c["met"] for place in places for c in figures["filesystems"][place]["checks"]]
    said = f"Targets met: {verdicts.count(True)}, missed: {verdicts.count(False)}, not measured: {verdicts.count(None)}."
    assert said in result.stderr, result.stderr[-3000:]


def test_pitr_benchmark_runs_end_to_end_on_a_small_database():
    result = _bench("bench_pitr.py", "--sizes-gb", "0.02", "--json", timeout=900)
    figures = json.loads(result.stdout)["0.02"]
    for key in ("pitr point", "restore beside", "pgBackRest alone", "pg_dump -Fc", "pg_restore"):
        assert figures[key] > 0, key
    assert figures["pg_dump + pg_restore"] == figures["pg_dump -Fc"] + figures["pg_restore"]
    assert "restore beside / pg_dump + pg_restore" in result.stderr


def test_undo_benchmark_runs_end_to_end_on_small_databases():
    result = _bench("bench_undo.py", "--sizes-gb", "0.02,0.04", "--records", "200", "--big-rows", "4000", "--json", timeout=900)
    figures = json.loads(result.stdout)
    capture = figures["capture"]
    assert all(v > 0 for v in capture["seconds"].values())
    assert capture["undo log / none"] == capture["seconds"]["undo log"] / capture["seconds"]["none"]
    for size in figures["sizes"].values():
        assert size["undo 1000 rows"]["deleted"]["public.orders"] == 400
        assert size["undo 1000 rows"]["restored"]["public.customers"] == 400
        assert size["undo 1000 rows"]["reinserted"]["public.orders"] == 200
        assert 0 < size["seconds"]["undo 1000, database"] < size["seconds"]["undo 1000, command"]
    assert figures["sizes"]["0.04"]["rows undone per second"] > 0
    assert "undo log / no capture" in result.stderr and "rows per second" in result.stderr
