"""The benchmark harness: each script's --quick run writes JSON with the expected keys and sane values.

These check the harness (timing, medians, ratios, subprocess memory, JSON),
not speed: a shared CI machine gives no stable absolute times.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common as C  # noqa: E402

# A --quick run must stay CI-sized (the brief: under 30 s each on 2 shared cores); a margin for a loaded machine.
QUICK_TIMEOUT_S = 120


def _run_quick(script: str, tmp_path: Path, timeout: float = QUICK_TIMEOUT_S) -> dict:
    out = tmp_path / f"{script}.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / f"{script}.py"), "--quick", "--threads", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    env = payload["environment"]
    assert env["quick"] is True and env["device"] == "cpu" and env["repeats"] == 2
    assert payload["benchmark"] == script
    assert payload["table"] and payload["table"] in proc.stdout
    return payload


def _positive_time(summary: dict, repeats: int = 2) -> float:
    assert len(summary["samples_s"]) == repeats
    assert all(t > 0 and math.isfinite(t) for t in summary["samples_s"])
    assert summary["min_s"] <= summary["median_s"] <= summary["max_s"]
    return summary["median_s"]


# ------------------------------------------------------------------ helpers
def test_summarize_median_of_samples():
    s = C.summarize([3.0, 1.0, 2.0, 10.0, 4.0])
    assert s["median_s"] == 3.0 and s["min_s"] == 1.0 and s["max_s"] == 10.0


def test_fit_exponent_recovers_power_law():
    sizes = [64, 216, 512, 1000]
    assert C.fit_exponent(sizes, [2e-9 * n**2 for n in sizes]) == pytest.approx(2.0, abs=1e-9)
    assert C.fit_exponent(sizes, [5e-6 * n for n in sizes]) == pytest.approx(1.0, abs=1e-9)


def test_peak_memory_sees_a_known_allocation():
    """A 64 MiB buffer touched inside the call reads as ~64 MiB; a call allocating nothing reads ~0."""
    import numpy as np

    def allocate() -> None:
        a = np.ones(8 * 2**20)  # 64 MiB of float64, written so the pages are resident
        a.sum()

    big = C.peak_memory_mib(allocate)["peak_mib"]
    small = C.peak_memory_mib(lambda: None)["peak_mib"]
    assert 60 <= big <= 80, big
    assert small < 4, small


def test_silicon_cells_have_the_requested_sizes():
    for n in (8, 64, 216, 512, 1000):
        assert len(C.silicon_cell(n)) == n
    cells = C.silicon_defect_cells(8)
    assert sorted({len(a) for a in cells}) == [63, 64, 65]
    assert len({a.info["defect"] for a in cells}) == 4


def test_run_worker_reports_a_clear_error(tmp_path):
    script = tmp_path / "broken.py"
    script.write_text("import sys; sys.exit('worker exploded')\n")
    with pytest.raises(RuntimeError, match="worker exploded"):
        C.run_worker(script, {"x": 1})


# ---------------------------------------------------------------- scripts
def test_bench_calculator_quick(tmp_path):
    p = _run_quick("bench_calculator", tmp_path)
    assert len(p["results"]) == 2
    for r in p["results"]:
        raw = _positive_time(r["raw_forward"])
        calc = _positive_time(r["calculator_get_forces"])
        assert r["ratio"] == pytest.approx(calc / raw)
        # The calculator returns the model's own forces (float32 model, float64 NumPy out).
        assert r["max_abs_force_difference"] < 1e-5
    assert p["goal_met"] is all(r["ratio"] <= p["goal"]["ratio_max"] for r in p["results"])


def test_bench_scaling_quick(tmp_path):
    p = _run_quick("bench_scaling", tmp_path)
    ns = [r["n_atoms"] for r in p["results"]]
    assert ns == sorted(ns) and len(ns) >= 3
    for r in p["results"]:
        fwd = _positive_time(r["forward"])
        assert r["forward_us_per_atom"] == pytest.approx(fwd / r["n_atoms"] * 1e6)
        _positive_time(r["bptt_frame"])
    fit = p["fit"]  # the harness's least-squares slopes of log(time) against log(atoms), recomputed here
    for key, column in (("forward_exponent_all_sizes", "forward"), ("bptt_frame_exponent_all_sizes", "bptt_frame")):
        slope = np.polyfit(np.log(ns), np.log([r[column]["median_s"] for r in p["results"]]), 1)[0]
        assert fit[key] == pytest.approx(slope, rel=1e-6)


def test_bench_relax_quick(tmp_path):
    p = _run_quick("bench_relax", tmp_path)
    modes = p["modes"]
    assert set(modes) == {"ase_fire", "learned_step_optimizer", "batched_rollout"}
    for m in modes.values():
        _positive_time(m["time"])
        assert m["structures_per_s"] == pytest.approx(p["n_structures"] / m["time"]["median_s"])
    assert p["speedup_batched_over_one_at_a_time"] == pytest.approx(
        modes["batched_rollout"]["structures_per_s"] / modes["learned_step_optimizer"]["structures_per_s"]
    )
    eq = p["equality_check"]
    assert eq["dtype"] == "float64"
    # The harness's own check that (b) and (c) agree: a real comparison, so it must pass even in quick mode.
    assert eq["max_abs_position_difference_A"] <= eq["tolerance_A"]
    assert eq["frames_equal"] is True


def test_bench_bptt_quick(tmp_path):
    p = _run_quick("bench_bptt", tmp_path)
    rows = p["results"]
    assert rows
    variants = {r["variant"] for r in rows}
    assert {"naive", "checkpoint_frames"} <= variants
    for r in rows:
        assert r["peak_mib"] > 0 and math.isfinite(r["peak_mib"])  # 0 would be a measurement that did not happen
        _positive_time(r["time"])
    # Memory must grow with the number of frames for the naive rollout (it keeps every frame's graph).
    naive = sorted(
        (r["k"], r["peak_mib"]) for r in rows if r["variant"] == "naive" and r["n_atoms"] == rows[0]["n_atoms"]
    )
    assert naive[-1][1] > naive[0][1]
    # Every variant computes the same gradient as naive (the harness checks it; a variant that does not is wrong).
    for r in rows:
        assert r["grad_rel_error_vs_naive"] < 1e-4, r


def test_device_cuda_is_accepted(tmp_path):
    """--device cuda runs where CUDA exists; elsewhere the script says so instead of a traceback."""
    import torch

    out = tmp_path / "x.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_calculator.py"), "--quick", "--device", "cuda", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=QUICK_TIMEOUT_S,
        cwd=ROOT,
    )
    if torch.cuda.is_available():
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(out.read_text())["environment"]["device"].startswith("cuda")
    else:
        assert proc.returncode != 0
        assert "CUDA is not available" in proc.stderr and "Traceback" not in proc.stderr
        assert not out.exists()


def test_bench_memory_estimate_quick(tmp_path):
    """The automatic batch size's estimate is an upper bound on the measured peak, within its stated factor."""
    from ase_bptt.relax.batching import ESTIMATE_FACTOR

    p = _run_quick("bench_memory_estimate", tmp_path, timeout=4 * QUICK_TIMEOUT_S)  # 3 measured rollouts
    assert {r["variant"] for r in p["results"]} == {"no_grad", "naive", "checkpoint_frames"}
    for r in p["results"]:
        assert r["ratio"] == pytest.approx(r["peak_mib"] / r["estimate_mib"])
        assert 1 / ESTIMATE_FACTOR <= r["ratio"] <= 1.0, r
    assert p["goal_met"] is True


def test_bench_throughput_quick(tmp_path):
    p = _run_quick("bench_throughput", tmp_path)
    rows = p["results"]
    assert sorted({r["batch"] for r in rows}) == [1, 4] and p["stop_reason"] == "max_batch"
    modes = {r["mode"] for r in rows}
    assert {"fixed", "fire", "ase_fire", "learned_step_optimizer"} <= modes
    assert ("torchsim_fire" in modes) == p["torchsim_available"]
    if not p["torchsim_available"]:
        assert "torch_sim not installed" in p["notes"][0] and "skipped" in p["table"]
    for r in rows:
        t = _positive_time(r["time"])
        assert r["structures_per_s"] == pytest.approx(r["batch"] / t)
        assert r["ms_per_structure_frame"] == pytest.approx(t / r["updates"] * 1e3)
        if r["mode"] == "fixed":  # tol=None: every structure takes every frame
            assert r["updates"] == r["batch"] * p["settings"]["max_steps"]
        if r["mode"] == "torchsim_fire":
            # Same FIRE as ASE's for the first Nmin + 1 steps (quick: 5), then a different alpha order.
            assert r["max_position_difference_vs_fire_A"] < 1e-5
            assert r["model_evaluations"] == r["updates"] + r["batch"]


def run_gpu_checks(device: str, out: Path) -> subprocess.CompletedProcess:
    """benchmarks/run_gpu_checks.sh --quick on two checks (each benchmark's quick run is tested above)."""
    return subprocess.run(
        ["bash", str(BENCH / "run_gpu_checks.sh"), "--device", device, "--quick", "--out", str(out)]
        + ["--only", "bench_calculator,bench_scaling"],
        capture_output=True,
        text=True,
        timeout=3 * QUICK_TIMEOUT_S,
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
    )


def test_gpu_check_script_runs_on_cpu(tmp_path):
    """benchmarks/run_gpu_checks.sh --device cpu --quick: JSON, log and status per check, machine notes.

    Two checks (``--only``): each benchmark's quick run is tested above, and all six in a row take
    ten minutes on a loaded 2-core machine.
    """
    out = tmp_path / "gpu"
    proc = run_gpu_checks("cpu", out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert {p.name for p in out.glob("*.json")} == {"bench_calculator.json", "bench_scaling.json"}
    for path in out.glob("*.json"):
        assert json.loads(path.read_text())["environment"]["device"] == "cpu"
        assert path.with_suffix(".log").exists()
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split()[:2] for line in summary] == [["bench_calculator", "ok"], ["bench_scaling", "ok"]]
    assert "device cpu --quick" in (out / "machine.txt").read_text()


def test_gpu_check_script_reports_a_failing_check(tmp_path):
    """A check that fails is marked FAILED, the others still run, and the exit status says so."""
    out = tmp_path / "gpu"
    proc = run_gpu_checks("cuda:99", out)
    assert proc.returncode == 1
    summary = (out / "summary.txt").read_text()
    assert summary.count("FAILED") == 2, summary


def test_bench_backends_quick(tmp_path):
    pytest.importorskip("chgnet")  # CI installs both extras (the test extra)
    pytest.importorskip("sevenn")
    p = _run_quick("bench_backends", tmp_path, timeout=3 * QUICK_TIMEOUT_S)  # three models, two batch sizes
    rows = p["results"]
    assert {(r["model"], r["variant"]) for r in rows} >= {
        (m, v) for m in ("adapt-mi", "chgnet", "sevenn") for v in ("naive", "checkpoint_frames", "no_grad")
    }
    for r in rows:
        assert r["peak_mib"] > 0 and math.isfinite(
            r["peak_mib"]
        )  # 0 would be a measurement that did not happen and r["estimate_mib"] > 0
        if r["variant"] == "no_grad":
            continue
        _positive_time(r["time"])
        assert r["grad_rel_error_vs_naive"] < 1e-4, r  # checkpointed frames give the naive gradient
        base = next(x for x in rows if (x["model"], x["batch"], x["variant"]) == ("adapt-mi", r["batch"], "naive"))
        assert r["time_ratio_to_adapt_mi"] == pytest.approx(r["time"]["median_s"] / base["time"]["median_s"])
