"""studies/interstitial_limits.py --quick: every stage runs on val only, with per-kind numbers, and a rerun reuses them."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "studies" / "interstitial_limits.py"
KINDS = ("vacancy", "divacancy", "interstitial-tetrahedral", "interstitial-split110")
#: Wall-clock limit (s); the quick run measured 35-40 s (~37 CPU-s) on the shared 2-core machine, both cores busy.
LIMIT_S = 120


def _run(out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            f"studies.{SCRIPT.stem}",
            "--quick",
            "--out",
            str(out),
            "--threads",
            "1",
            "--seed",
            "0",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=LIMIT_S,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, time.perf_counter() - start


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("limits")
    _, wall = _run(out)
    return out, json.loads((out / "results.json").read_text()), wall


def _finite_or_none(x) -> bool:
    return x is None or math.isfinite(x)


def _per_kind(d: dict) -> None:
    assert set(KINDS) <= set(d), d
    assert all(_finite_or_none(v) for v in d.values())
    assert any(v is not None for v in d.values())


def test_every_stage_with_per_kind_numbers(quick):
    out, results, wall = quick
    assert wall < LIMIT_S
    assert (out / "summary.md").read_text().startswith("# What limits")
    st = results["stages"]
    assert set(st) == {"oracle", "pretrain", "bptt", "fire"}
    assert results["settings"]["split_scored"] == "val"
    assert set(st["oracle"]["etas"]) == {"0.035", "0.065"}
    for entry in st["oracle"]["etas"].values():
        assert math.isfinite(entry["mean"])
        _per_kind(entry["per_kind"])
    assert set(st["pretrain"]) == {"adapt-d32", "adapt-d32-translate", "adapt-d64x3", "adapt-mi"}
    for p in st["pretrain"].values():
        assert p["force_mae"] > 0 and p["force_rmse"] >= p["force_mae"]
        _per_kind(p["force_mae_per_kind"])
        _per_kind(p["fixed_step"]["per_kind"])
        assert p["eta"] in (0.035, 0.065)
    assert set(st["bptt"]) == {"adapt-d32", "adapt-mi-w0", "adapt-mi-w10", "adapt-mi-w50"}
    for b in st["bptt"].values():
        assert b["exported"] in ("tuned", "pretrained")
        assert b["ratio"] == pytest.approx(b["own_rule"]["mean"] / b["pretrained_fixed_step"]["mean"])
        _per_kind(b["own_rule"]["per_kind"])
        _per_kind(b["ratio_per_kind"])
        assert b["force_mae"] > 0
    assert [st["bptt"][f"adapt-mi-w{w}"]["options"]["force_weight"] for w in (0, 10, 50)] == [0.0, 10.0, 50.0]
    fire = st["fire"]
    assert fire["ratio"] == pytest.approx(fire["tuned_fire"]["mean"] / fire["pretrained_fire"]["mean"])
    _per_kind(fire["ratio_per_kind"])


def test_test_split_is_never_scored(quick):
    out, _, _ = quick
    for report in out.rglob("report.json"):
        assert json.loads(report.read_text())["split"] == "val", report


def test_rerun_reuses_finished_stages(quick):
    out, results, _ = quick
    proc, wall = _run(out, "--stages", "oracle,bptt")
    assert "pretraining" not in proc.stdout and "BPTT adapt" not in proc.stdout
    again = json.loads((out / "results.json").read_text())
    assert again["stages"] == results["stages"]
    assert wall < 30
