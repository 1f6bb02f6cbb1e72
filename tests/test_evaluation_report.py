"""The report's figures: correct-basin fractions, the paired plot's data, and structures that cannot be evaluated.

Tiny EMT copper databases from test_evaluation_evaluate, plus one test structure
holding nickel, an element the checkpoints were never trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.geometry import find_mic
from test_evaluation_evaluate import PNG_MAGIC, emt_relaxation, make_checkpoint, make_db

from ase_bptt.batch import Batch
from ase_bptt.data.db import TrajectoryDB
from ase_bptt.evaluation.pipeline import EmptySplitError, evaluate
from ase_bptt.evaluation.plots import plot_paired
from ase_bptt.evaluation.report import summary_text
from ase_bptt.evaluation.rows import PLOT_FILES
from ase_bptt.metrics import CORRECT_BASIN_RMS, correct_basin, rms_distance

#: Same float64 numbers through two implementations.
TIGHT = 1e-9


def nickel_trajectory(seed: int = 99) -> list:
    """An EMT relaxation of a Cu cell with one atom replaced by Ni (frames re-labelled after the swap)."""
    out = []
    for f in emt_relaxation(seed, vacancy=True):
        g = f.copy()
        g.numbers[0] = 28
        g.calc = SinglePointCalculator(g, energy=f.get_potential_energy(), forces=f.get_forces())
        out.append(g)
    return out


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    db = make_db(root / "cu.db", {"train": 1, "val": 1, "test": 3})
    pre = make_checkpoint(root / "pretrained.pt", db, step_rule=False, seed=1)
    tuned = make_checkpoint(root / "tuned.pt", db, eta=0.02, max_steps=8)
    # Added after the models are fitted, so they never saw nickel.
    db.add_trajectory(nickel_trajectory(), label="nickel", source="test", split="test")
    result = evaluate(
        [pre, tuned],
        db,
        root / "out",
        baselines=["emt"],
        eta_grid=[0.005, 0.02],
        fire_fmax=0.02,
        fire_steps=5,
        max_steps=8,
        dtype="float64",
        device="cpu",
        progress=False,
    )
    return root, db, result


def test_basin_metric_hand_computed():
    cell = [10.0, 10.0, 10.0]
    a = Atoms("Cu4", positions=[[0.1, 1, 1], [3, 3, 3], [5, 5, 5], [7, 7, 7]], cell=cell, pbc=True)
    b = Atoms("Cu4", positions=[[1, 1, 1], [3, 3, 3], [5, 5, 5], [7, 7, 7]], cell=cell, pbc=True)
    batch = Batch.from_atoms([a, b], dtype=torch.float64)
    ref = batch.positions.clone()
    ref[0, 0, 0] = 9.8  # 0.3 A across the periodic boundary, not 9.7 A
    ref[1, :, 2] += 0.05  # every atom 0.05 A
    # by hand: sqrt(0.3^2 / 4) = 0.15 A and sqrt(4 * 0.05^2 / 4) = 0.05 A
    assert rms_distance(batch.positions, ref, batch).tolist() == pytest.approx([0.15, 0.05], rel=1e-12)
    assert correct_basin(batch.positions, ref, batch).tolist() == [False, True]
    assert correct_basin(batch.positions, ref, batch, threshold=0.2).tolist() == [True, True]
    assert CORRECT_BASIN_RMS == 0.1


def test_basin_fractions_match_numpy(report):
    _, db, result = report
    trajs = [t for t in db.trajectories(split="test") if t.label != "nickel"]
    rms = []
    for t in trajs:
        d, _ = find_mic(t.frames[0].positions - t.frames[-1].positions, t.frames[-1].cell, True)
        rms.append(float(np.sqrt((d * d).sum() / len(d))))
    entry = result["do_nothing"]
    np.testing.assert_allclose(entry["rms_distance"], rms, rtol=TIGHT)
    basin = entry["correct_basin"]
    assert basin["threshold"] == CORRECT_BASIN_RMS
    assert basin["fraction"] == pytest.approx(np.mean([r <= CORRECT_BASIN_RMS for r in rms]))
    for lab in {t.label for t in trajs}:
        flags = [r <= CORRECT_BASIN_RMS for r, t in zip(rms, trajs) if t.label == lab]
        assert basin["per_label"][lab] == pytest.approx(np.mean(flags))
    # Every method carries the figure, and the report shows it next to mean Dq.
    for ck in result["checkpoints"]:
        for key in ("fire", "fixed_step_selected", "own_rule"):
            if ck.get(key):
                assert 0.0 <= ck[key]["correct_basin"]["fraction"] <= 1.0
    assert result["baselines"][0]["correct_basin"]["threshold"] == CORRECT_BASIN_RMS


def test_plots_written_and_paired_data_equal_report_json(report, tmp_path):
    root, _, _ = report
    out = root / "out"
    md = (out / "report.md").read_text()
    for name in PLOT_FILES.values():
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
        assert f"({name})" in md
    assert "dq_before_after.png" not in md
    on_disk = json.loads((out / "report.json").read_text())
    pre, tuned = on_disk["checkpoints"]
    (series,) = on_disk["paired"]
    assert series["x_model"] == "pretrained" and series["x_method"] == "fixed_step_selected"
    assert series["y_model"] == "tuned" and series["y_method"] == "own_rule"
    assert series["traj_id"] == [s["traj_id"] for s in on_disk["structures"]]
    assert series["x"] == pre["fixed_step_selected"]["per_structure"]
    assert series["y"] == tuned["own_rule"]["per_structure"]
    # What the figure actually draws, per label, is those numbers.
    drawn = plot_paired(on_disk, tmp_path / "paired.png")
    labels = [s["label"] for s in on_disk["structures"]]
    assert sorted(d["label"] for d in drawn) == sorted(set(labels))
    for d in drawn:
        idx = [i for i, lab in enumerate(labels) if lab == d["label"]]
        assert d["x"] == pytest.approx([series["x"][i] for i in idx], rel=TIGHT)
        assert d["y"] == pytest.approx([series["y"][i] for i in idx], rel=TIGHT)


def test_unseen_species_are_listed_not_fatal(report):
    root, db, result = report
    nickel = next(t for t in db.trajectories(split="test") if t.label == "nickel")
    assert result["n_structures"] == 3 and "nickel" not in result["label_counts"]
    (skipped,) = result["skipped"]
    assert skipped["traj_id"] == str(nickel.traj_id) and skipped["label"] == "nickel"
    assert "contains Ni" in skipped["reason"] and skipped["reason"].startswith("pretrained:")
    assert len(result["checkpoints"][1]["own_rule"]["per_structure"]) == 3
    md = (root / "out" / "report.md").read_text()
    assert "## Structures not evaluated" in md and str(nickel.traj_id) in md
    assert "1 structure(s) not evaluated" in summary_text(result)


def test_no_evaluable_structure_is_a_clear_error(report, tmp_path):
    root, _, _ = report
    db = TrajectoryDB(tmp_path / "ni.db", create=True)
    db.add_trajectory(nickel_trajectory(), label="nickel", source="test", split="test")
    with pytest.raises(EmptySplitError, match="no structure of split 'test'.*can be evaluated.*contains Ni"):
        evaluate([root / "tuned.pt"], db, tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_no_plots_writes_the_same_report_without_pngs(report, tmp_path):
    """``write_report(plots=False)``: the same report.json, report.md without images, no PNG on disk."""
    from ase_bptt.evaluation.report import report_files, write_report

    root, _, result = report
    paths = write_report(result, tmp_path / "bare", plots=False)
    assert paths == report_files(tmp_path / "bare", plots=False) and set(paths) == {"markdown", "json"}
    assert sorted(p.name for p in (tmp_path / "bare").iterdir()) == ["report.json", "report.md"]
    md = (tmp_path / "bare" / "report.md").read_text()
    assert "![" not in md and "--no-plots" in md
    full = (root / "out" / "report.md").read_text()
    assert md.split("## Plots")[0] == full.split("## Plots")[0]  # every table is kept
    assert json.loads((tmp_path / "bare" / "report.json").read_text()) == json.loads(
        (root / "out" / "report.json").read_text()
    )
    # The full report's own file list names exactly what it wrote.
    on_disk = json.loads((root / "out" / "report.json").read_text())
    assert {Path(p).name for p in on_disk["files"].values()} == {"report.md", "report.json", *PLOT_FILES.values()}


def test_the_console_prints_report_jsons_numbers(report):
    """Every row of the console table carries report.json's mean, median, force and energy MAE, and every
    comparison line its mean ratio, median ratio and fraction improved, as printed (3 decimals, whole percent)."""
    from ase_bptt.evaluation.rows import fmt, method_rows

    root, _, result = report
    on_disk = json.loads((root / "out" / "report.json").read_text())
    text = summary_text(on_disk)
    lines = text.splitlines()
    for row in method_rows(on_disk):
        printed = next(line for line in lines if line.startswith(row["method"]) and f" {row['model']} " in line)
        cells = printed[len(row["method"]) :].split()
        for value in (row["dq_mean"], row["dq_median"], row["force_mae"], row["energy_mae"]):
            assert fmt(value) in cells, (row["method"], value, printed)
    assert on_disk["comparisons"]
    for c in on_disk["comparisons"]:
        printed = [line for line in lines if line.lstrip().startswith(c["model"]) and c["against_label"] in line]
        expected = [fmt(c["mean_ratio"]), fmt(c["median_ratio"]), f"{round(100 * c['improved'])}%"]
        assert any(all(e in line.split() for e in expected) for line in printed), (c, printed)
