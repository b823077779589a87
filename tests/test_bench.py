"""The benchmark keeps working (tiny size, no DSLR): its figures are for people, not asserted."""

from __future__ import annotations

import json
import os
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
        assert fs["checks"] and all(c["met"] in (True, False, None) for c in fs["checks"]), place
        assert not Path(fs["server_dir"]).exists(), f"{place}: the server's folder was left behind"
    if os.geteuid() == 0:
        xfs = figures["filesystems"]["xfs"]
        assert xfs["fstype"] == "xfs"
        assert all(size["seconds"]["server copy (clone)"] > 0 for size in xfs["sizes"].values())
        assert xfs["mount"] not in Path("/proc/mounts").read_text() and not Path(xfs["image"]).exists()
    assert "quick rollback" in result.stderr and "met" in result.stderr and "larger/smaller" in result.stderr


def test_pitr_benchmark_runs_end_to_end_on_a_small_database():
    result = _bench("bench_pitr.py", "--sizes-gb", "0.02", "--json", timeout=900)
    figures = json.loads(result.stdout)["0.02"]
    for key in ("pitr point", "restore beside", "pgBackRest alone", "pg_dump -Fc", "pg_restore"):
        assert figures[key] > 0, key
    assert figures["pg_dump + pg_restore"] == figures["pg_dump -Fc"] + figures["pg_restore"]
    assert "restore beside / pg_dump + pg_restore" in result.stderr
