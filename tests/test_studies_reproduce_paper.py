"""studies/reproduce_paper.py --quick runs every stage and writes a complete report."""

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
SCRIPT = ROOT / "studies" / "reproduce_paper.py"
#: Wall-clock limit of the quick run (s); it takes about a minute on an idle 2-core machine.
QUICK_LIMIT_S = 600

TABLE_HEADINGS = (
    "## Table 3",
    "## Per-defect breakdown",
    "## Table 1",
    "## Table 2",
    "## Table 4",
    "## Table 5",
    "## Figure 5",
    "## Table 6",
    "## Pure crystals: EMT alloys",
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("repro")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", f"studies.{SCRIPT.stem}", "--quick", "--out", str(out), "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=QUICK_LIMIT_S,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _tables(markdown: str) -> dict[str, list[list[str]]]:
    """Markdown tables by the heading above them: rows of cells (header row first)."""
    tables: dict[str, list[list[str]]] = {}
    heading = None
    for line in markdown.splitlines():
        if line.startswith("## "):
            heading = line
        elif line.startswith("|") and heading is not None and not line.startswith("| ---") and "---" not in line:
            tables.setdefault(heading, []).append([c.strip() for c in line.strip("|").split("|")])
    return tables


def test_report_files_and_tables(quick_run):
    md = (quick_run / "report.md").read_text()
    for heading in TABLE_HEADINGS:
        assert any(line.startswith(heading) for line in md.splitlines()), heading
    tables = _tables(md)
    table3 = next(rows for h, rows in tables.items() if h.startswith("## Table 3"))
    assert table3[0][:2] == ["method", "mean Dq"]
    assert [r[0].split(" ")[0] for r in table3[1:]] == ["ADAPT", "ADAPT,", "ADAPT,", "BPTT", "BPTT-tuned"]
    for row in table3[1:]:
        assert math.isfinite(float(row[1])), row
    table4 = next(rows for h, rows in tables.items() if h.startswith("## Table 4"))
    assert [r[0] for r in table4[1:]] == [
        "ADAPT",
        "ADAPT+Momentum",
        "ADAPT+Anneal",
        "ADAPT+Momentum+Anneal",
        "BPTT",
        "BPTT+Momentum",
        "BPTT+Anneal",
        "BPTT+Momentum+Anneal",
    ]
    for name in ("eta_curve.png", "bptt_curves.png", "per_defect.png", "report.json"):
        assert (quick_run / name).stat().st_size > 0, name


def test_report_numbers_match_an_independent_recomputation(quick_run):
    """The do-nothing Dq and the ratios in report.json, recomputed with NumPy from the database."""
    from ase_bptt.data.db import TrajectoryDB

    report = json.loads((quick_run / "report.json").read_text())
    db = TrajectoryDB(quick_run / "si.db", create=False)
    dq = []
    for traj in db.trajectories(split="test"):
        a0, a1 = traj.initial, traj.final
        frac = np.linalg.solve(a1.cell.array.T, (a0.positions - a1.positions).T).T
        frac -= np.round(frac)
        d = frac @ a1.cell.array
        dq.append(math.sqrt(float((a1.get_masses()[:, None] * d**2).sum())))
    assert report["si"]["do_nothing"] == pytest.approx(float(np.mean(dq)), rel=1e-9)
    t3 = report["si"]["table3"]
    assert report["ratios"]["bptt_over_fixed"] == pytest.approx(t3["bptt"] / t3["fixed_val"], rel=1e-12)
    assert report["ratios"]["bptt_over_fire"] == pytest.approx(t3["bptt"] / t3["fire"], rel=1e-12)
    # The tuned model with ASE FIRE, from the evaluation report, over the pretrained model with ASE FIRE.
    ev = json.loads((quick_run / "eval-si" / "report.json").read_text())
    by_name = {c["name"]: c for c in ev["checkpoints"]}
    tuned_fire = by_name["BPTT"]["fire"]["dq"]["mean"]
    assert report["ratios"]["tuned_fire_over_fire"] == pytest.approx(tuned_fire / t3["fire"], rel=1e-12)
    counts = report["settings"]["si_counts"]
    assert len(db.trajectories(split="test")) == counts["test"]
    assert len(db.trajectories(split="train")) == counts["train"]


def test_report_only_rerenders_the_same_tables_without_evaluating(quick_run):
    before = _tables((quick_run / "report.md").read_text())
    stamp = (quick_run / "eval-si" / "report.json").stat().st_mtime_ns
    proc = subprocess.run(
        [sys.executable, "-m", f"studies.{SCRIPT.stem}", "--quick", "--out", str(quick_run), "--report-only"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _tables((quick_run / "report.md").read_text()) == before
    # The test split was not evaluated again.
    assert (quick_run / "eval-si" / "report.json").stat().st_mtime_ns == stamp


def test_seed_is_a_new_experiment_and_no_ablations_keeps_the_main_tables(quick_run, tmp_path):
    """Also ``--step fire``: the main BPTT run goes through the differentiable FIRE."""
    from ase_bptt.data.db import TrajectoryDB

    args = ["--quick", "--seed", "1", "--no-ablations", "--no-alloys", "--step", "fire", "--threads", "1"]
    args += ["--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", f"studies.{SCRIPT.stem}", *args],
        capture_output=True,
        text=True,
        timeout=QUICK_LIMIT_S,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (tmp_path / "report.md").read_text()
    # The report names the command that made it, flags included.
    assert "Made by `python -m studies.reproduce_paper " + " ".join(args) + "`" in md
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    for kept in ("## Table 3", "## Per-defect breakdown", "## Table 2", "## Table 6"):
        assert any(h.startswith(kept) for h in headings), kept
    for dropped in ("## Table 1", "## Table 4", "## Table 5", "## Figure 5", "## Pure crystals"):
        assert not any(h.startswith(dropped) for h in headings), dropped
    assert json.loads((tmp_path / "report.json").read_text())["settings"]["seed"] == 1
    # Another seed draws other structures: the test split shares no initial structure with seed 0's.
    seed0 = [t.initial.positions for t in TrajectoryDB(quick_run / "si.db", create=False).trajectories(split="test")]
    seed1 = [t.initial.positions for t in TrajectoryDB(tmp_path / "si.db", create=False).trajectories(split="test")]
    assert len(seed1) == len(seed0)
    assert not any(a.shape == b.shape and np.allclose(a, b) for a in seed0 for b in seed1)
    # --step fire: the main run is tuned through the FIRE rule, tol FIRE_TOL, and the report says so.
    finetune = json.loads((tmp_path / "report.json").read_text())["settings"]["finetune"]
    assert finetune["step"] == "fire" and finetune["eta"] is None and finetune["tol"] == 1e-5
    assert "BPTT-tuned model + ASE FIRE" in md and "deployed with ASE FIRE" in md
