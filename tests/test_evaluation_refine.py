"""``evaluate --refine-with``: the reference steps each method's final structures still need, and the comparisons.

Small silicon cells relaxed with Stillinger-Weber and ASE FIRE, the reference
calculator the refinement uses, so refining the initial structure repeats the
reference relaxation exactly: a hand-checkable case. The other starts are checked
against ASE run here (ASE FIRE with the checkpoint, then ASE FIRE with SW).
"""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
import torch
from ase.optimize import FIRE
from click.testing import CliRunner
from test_evaluation_baselines import silicon_relaxation
from test_evaluation_evaluate import independent_dq, make_checkpoint

from ase_bptt.calculator import BPTTCalculator
from ase_bptt.cli import cli
from ase_bptt.data.db import TrajectoryDB
from ase_bptt.data.recipes import stillinger_weber
from ase_bptt.evaluation.compare import ratio_stats
from ase_bptt.evaluation.refine import RefineError, parse_refinement
from ase_bptt.evaluation.report import summary_text
from ase_bptt.evaluation.rows import fmt

#: Same float64 positions through two implementations of Dq.
SAME_RUN = 1e-9
#: The reference relaxations' force criterion (silicon_relaxation) and the refinement's.
FMAX = 0.01
FIRE_STEPS = 30


@pytest.fixture(scope="module")
def refined(tmp_path_factory):
    root = tmp_path_factory.mktemp("refine")
    calc = stillinger_weber()
    db = TrajectoryDB(root / "si.db", create=True)
    for seed, split in enumerate(["train", "val", "test", "test", "test"]):
        db.add_trajectory(silicon_relaxation(seed, calc), label=f"v{seed % 2}", source="test", split=split)
    pre = make_checkpoint(root / "pretrained.pt", db, step_rule=False, species=(14,))
    tuned = make_checkpoint(root / "tuned.pt", db, max_steps=10, seed=1, species=(14,))
    args = [str(pre), str(tuned), "--db", str(root / "si.db"), "-o", str(root / "report"), "--no-plots"]
    args += ["--eta-grid", "0.01", "--max-steps", "10", "--fire-fmax", "0.02", "--fire-steps", str(FIRE_STEPS)]
    args += ["--refine-with", "sw", "--refine-fmax", str(FMAX), "--refine-steps", "300"]
    res = CliRunner().invoke(cli, ["--quiet", "evaluate", *args, "--dtype", "float64", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    report = json.loads((root / "report" / "report.json").read_text())
    return root, db, pre, report, res.output


def by_method(report, model, method):
    return next(m for m in report["refinement"]["methods"] if (m["model"], m["method"]) == (model, method))


def test_refining_the_initial_structure_repeats_the_reference_relaxation(refined):
    _, db, _, report, _ = refined
    trajs = db.trajectories(split="test")
    initial = by_method(report, "-", "do_nothing")
    # silicon_relaxation stores every FIRE step's frame: the same FIRE, calculator and fmax take len - 1 steps
    assert initial["steps"] == [len(t.frames) - 1 for t in trajs]
    assert initial["converged"] == [True] * len(trajs)
    assert initial["dq_after"] == pytest.approx([0.0] * len(trajs), abs=1e-9)
    assert initial["vs_initial"] == {"mean_ratio": 1.0, "median_ratio": 1.0, "improved": 0.0, "n": len(trajs)}
    assert report["refinement"]["calculator"] == "sw" and report["refinement"]["optimizer"] == "FIRE"


def test_refining_the_pretrained_fire_result_equals_ase_run_here(refined):
    _, db, pre, report, _ = refined
    steps, dq_after = [], []
    for t in db.trajectories(split="test"):
        atoms = t.frames[0].copy()
        atoms.calc = BPTTCalculator(pre, device="cpu", dtype=torch.float64)
        FIRE(atoms, logfile=None).run(fmax=0.02, steps=FIRE_STEPS)
        atoms.calc = stillinger_weber()
        opt = FIRE(atoms, logfile=None)
        opt.run(fmax=FMAX, steps=300)
        steps.append(opt.nsteps)
        dq_after.append(independent_dq(atoms.positions, t.frames[-1]))
    fire = by_method(report, "pretrained", "fire")
    assert fire["steps"] == steps
    np.testing.assert_allclose(fire["dq_after"], dq_after, rtol=SAME_RUN, atol=1e-12)
    assert fire["steps_median"] == statistics.median(steps)
    initial = by_method(report, "-", "do_nothing")["steps"]
    assert fire["vs_initial"]["median_ratio"] == pytest.approx(statistics.median(np.divide(steps, initial)))


def test_every_method_is_refined_and_printed_as_in_report_json(refined):
    root, _, _, report, output = refined
    methods = {(m["model"], m["method"]) for m in report["refinement"]["methods"]}
    assert methods == {
        ("-", "do_nothing"),
        ("pretrained", "fire"),
        ("pretrained", "fixed_step_selected"),
        ("tuned", "fire"),
        ("tuned", "fixed_step_selected"),
        ("tuned", "own_rule"),
    }
    head = "refined with sw and ASE FIRE to fmax 0.01 eV/A"
    table = output[output.index(head) :].splitlines()
    for m in report["refinement"]["methods"]:
        line = next(x for x in table if x.startswith(m["label"]))
        assert fmt(m["steps_mean"]) in line and fmt(m["vs_initial"]["median_ratio"]) in line, line
    assert "## Reference steps still needed" in (root / "report" / "report.md").read_text()
    assert summary_text(report) in output


def test_comparisons_are_recomputed_from_the_per_structure_lists(refined):
    _, _, _, report, output = refined
    pre, tuned = report["checkpoints"]
    comps = {(c["method"], c["against_model"], c["against"]): c for c in report["comparisons"]}
    assert set(comps) == {
        ("own_rule", "pretrained", "fixed_step_selected"),
        ("own_rule", "pretrained", "fire"),
        ("fire", "pretrained", "fixed_step_selected"),
        ("fire", "pretrained", "fire"),
    }
    own = np.array(tuned["own_rule"]["per_structure"])
    for against in ("fixed_step_selected", "fire"):
        base = np.array(pre[against]["per_structure"])
        c = comps[("own_rule", "pretrained", against)]
        assert c["mean_ratio"] == pytest.approx(own.mean() / base.mean(), rel=SAME_RUN)
        assert c["median_ratio"] == pytest.approx(float(np.median(own / base)), rel=SAME_RUN)
        assert c["improved"] == float(np.mean(own < base)) and c["n"] == len(own)
        line = next(
            x for x in output.splitlines() if x.startswith("tuned") and f"pretrained: {c['against_label']}" in x
        )
        assert fmt(c["mean_ratio"]) in line and fmt(c["median_ratio"]) in line
    # The tuned model's force and energy errors, as ratios to the pretrained model's.
    ratio = tuned["forces"]["mae"] / pre["forces"]["mae"]
    assert f"({ratio:.2f}x pretrained's)" in output


def test_ratio_stats_hand_computed():
    # per-structure ratios 0.5, 1, 3: median 1; means 6 / 5; one of three improved; None pairs are left out
    stats = ratio_stats([1.0, 2.0, 3.0, None], [2.0, 2.0, 1.0, 4.0])
    assert stats == {"mean_ratio": pytest.approx(1.2), "median_ratio": 1.0, "improved": pytest.approx(1 / 3), "n": 3}
    assert ratio_stats([], []) == {"mean_ratio": None, "median_ratio": None, "improved": None, "n": 0}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--refine-with", "nosuchcalc"], "--refine-with 'nosuchcalc'"),
        (["--refine-with", "sw", "--refine-optimizer", "Newton"], "'Newton' is not one of"),
        (["--refine-with", "sw", "--refine-fmax", "0"], "--refine-fmax"),
        (["--refine-with", "sw", "--refine-steps", "0"], "--refine-steps"),
    ],
)
def test_bad_refine_options_are_usage_errors_before_anything_is_written(refined, tmp_path, options, message):
    root, _, pre, _, _ = refined
    args = ["evaluate", str(pre), "--db", str(root / "si.db"), "-o", str(tmp_path / "out"), *options]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_parse_refinement_names_the_option():
    with pytest.raises(RefineError, match="--refine-optimizer 'Newton'"):
        parse_refinement("sw", optimizer="Newton")
    with pytest.raises(RefineError, match="--refine-fmax"):
        parse_refinement("sw", fmax=float("nan"))
