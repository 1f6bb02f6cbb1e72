"""Baseline rows of evaluate: ASE FIRE with any ASE calculator, checked against ASE FIRE run here.

Two settings the suite can compute: EMT on small copper cells (the databases
of test_evaluation_evaluate) and Stillinger-Weber on small silicon cells, through
the command line exactly as the issue states it
(``--baseline sw --baseline emt``; EMT has no silicon, so that row lists
every structure as not relaxed, with the reason).
"""

from __future__ import annotations

import json
import socket
import sys

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.calculator import Calculator
from ase.calculators.emt import EMT
from ase.optimize import FIRE
from click.testing import CliRunner
from test_evaluation_evaluate import independent_dq, make_checkpoint, make_db

from ase_bptt.cli import cli
from ase_bptt.data.db import TrajectoryDB
from ase_bptt.data.generate import relax_frames
from ase_bptt.data.recipes import MissingDependencyError, stillinger_weber
from ase_bptt.evaluation.baselines import BaselineError, parse_baseline
from ase_bptt.evaluation.pipeline import evaluate

#: ASE FIRE with the same float64 calculator twice: identical positions; Dq by two implementations.
SAME_RUN = 1e-9
FMAX = 0.02
STEPS = 30


def direct_fire_dq(calc, trajs, *, fmax: float = FMAX, steps: int = STEPS) -> list[float]:
    """Dq after ``ase.optimize.FIRE`` with ``calc`` from each trajectory's first frame, computed here."""
    out = []
    for t in trajs:
        atoms = t.frames[0].copy()
        atoms.calc = calc
        FIRE(atoms, logfile=None).run(fmax=fmax, steps=steps)
        out.append(independent_dq(atoms.positions, t.frames[-1]))
    return out


@pytest.fixture(scope="module")
def copper(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    db = make_db(root / "cu.db", {"train": 1, "val": 1, "test": 3})
    ckpt = make_checkpoint(root / "cu.pt", db, max_steps=10)
    result = evaluate(
        [ckpt],
        db,
        root / "report",
        baselines=["emt"],
        eta_grid=[0.01],
        fire_fmax=FMAX,
        fire_steps=STEPS,
        max_steps=10,
        dtype="float64",
        device="cpu",
        progress=False,
    )
    return root, db, result


def test_emt_row_equals_ase_fire_with_emt(copper):
    root, db, result = copper
    trajs = db.trajectories(split="test")
    expected = direct_fire_dq(EMT(), trajs)
    (row,) = result["baselines"]
    assert row["name"] == "emt" and row["calculator"] == "EMT"
    assert row["fmax"] == FMAX and row["max_steps"] == STEPS and row["failed"] == []
    np.testing.assert_allclose(row["per_structure"], expected, rtol=SAME_RUN)
    assert row["dq"]["mean"] == pytest.approx(np.mean(expected), rel=SAME_RUN)
    for lab in {t.label for t in trajs}:
        vals = [e for e, t in zip(expected, trajs) if t.label == lab]
        assert row["dq"]["per_label"][lab]["mean"] == pytest.approx(np.mean(vals), rel=SAME_RUN)
    # The same structures and the same fmax / step limit as the model's own FIRE row.
    assert len(row["per_structure"]) == len(result["checkpoints"][0]["fire"]["per_structure"])
    assert result["checkpoints"][0]["fire"]["fmax"] == FMAX
    on_disk = json.loads((root / "report" / "report.json").read_text())
    assert on_disk["baselines"][0]["per_structure"] == pytest.approx(expected, rel=SAME_RUN)
    md = (root / "report" / "report.md").read_text()
    assert "| ASE FIRE with emt" in md


def silicon_relaxation(seed: int, calc) -> list:
    """Frames of an SW FIRE relaxation of a rattled 8-site Si cell with one vacancy."""
    atoms = bulk("Si", "diamond", a=5.431, cubic=True)
    del atoms[seed % 8]
    atoms.positions += np.random.default_rng(seed).normal(scale=0.08, size=atoms.positions.shape)
    return relax_frames(atoms, calc, fmax=0.01, max_steps=300)


def test_cli_sw_and_emt_baselines_on_silicon(tmp_path):
    calc = stillinger_weber()
    db = TrajectoryDB(tmp_path / "si.db", create=True)
    for seed, split in enumerate(["train", "val", "test", "test"]):
        db.add_trajectory(silicon_relaxation(seed, calc), label="vacancy", source="test", split=split)
    pre = make_checkpoint(tmp_path / "pretrained.pt", db, step_rule=False, species=(14,))
    tuned = make_checkpoint(tmp_path / "tuned.pt", db, max_steps=10, seed=1, species=(14,))
    args = [str(pre), str(tuned), "--db", str(tmp_path / "si.db"), "-o", str(tmp_path / "report")]
    args += ["--baseline", "sw", "--baseline", "emt", "--eta-grid", "0.01", "--max-steps", "10"]
    args += ["--fire-fmax", str(FMAX), "--fire-steps", str(STEPS), "--dtype", "float64", "--device", "cpu"]
    res = CliRunner().invoke(cli, ["--quiet", "evaluate", *args])
    assert res.exit_code == 0, res.output
    assert "ASE FIRE with sw" in res.output and "ASE FIRE with emt" in res.output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    sw, emt = report["baselines"]
    expected = direct_fire_dq(stillinger_weber(), db.trajectories(split="test"))
    np.testing.assert_allclose(sw["per_structure"], expected, rtol=SAME_RUN)
    assert sw["failed"] == [] and sw["n_evaluated"] == 2
    # EMT knows no silicon: its row relaxes nothing and says why; the other rows are unaffected.
    assert emt["n_evaluated"] == 0 and emt["dq"] is None and len(emt["failed"]) == 2
    assert all("No EMT-potential for Si" in f["reason"] for f in emt["failed"]), emt["failed"]
    assert report["n_structures"] == 2 and report["skipped"] == []
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Structures a baseline could not relax" in md


def test_bad_baseline_is_a_usage_error_before_anything_is_written(copper, tmp_path):
    root, _, _ = copper
    args = ["evaluate", str(root / "cu.pt"), "--db", str(root / "cu.db"), "-o", str(tmp_path / "out")]
    res = CliRunner().invoke(cli, [*args, "--baseline", "nosuchcalc"])
    assert res.exit_code == 2 and "--baseline 'nosuchcalc'" in res.output
    res = CliRunner().invoke(cli, [*args, "--baseline", "emt,notkeyvalue"])
    assert res.exit_code == 2 and "is not key=value" in res.output
    assert not (tmp_path / "out").exists()


def test_key_values_reach_the_calculator():
    b = parse_baseline("ase.calculators.lj:LennardJones,sigma=2.3,epsilon=0.5")
    calc = b.calculator()
    assert isinstance(calc, Calculator)
    assert calc.parameters["sigma"] == 2.3 and calc.parameters["epsilon"] == 0.5
    with pytest.raises(BaselineError, match="cannot import"):
        parse_baseline("ase.calculators.nope:Thing")


def test_chgnet_missing_is_a_one_line_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "chgnet", None)  # hides an installed chgnet: import raises ImportError
    monkeypatch.setitem(sys.modules, "chgnet.model", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'ase-bptt\[chgnet\]'"):
        parse_baseline("chgnet")
    res = CliRunner().invoke(cli, ["evaluate", "x.pt", "--db", "x.db", "-o", "out", "--baseline", "chgnet"])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        "Error: --baseline chgnet needs the chgnet package: pip install 'ase-bptt[chgnet]'"
    ]


@pytest.mark.slow
def test_chgnet_runs_offline_and_equals_ase_fire_with_chgnet(copper, monkeypatch):
    pytest.importorskip("chgnet")
    from chgnet.model.dynamics import CHGNetCalculator

    def no_network(*args, **kwargs):
        raise AssertionError("CHGNet tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    _, db, _ = copper
    trajs = db.trajectories(split="test")[:1]
    expected = direct_fire_dq(CHGNetCalculator(use_device="cpu"), trajs, steps=5)
    b = parse_baseline("chgnet")
    from ase_bptt.evaluation.baselines import run_baseline
    from ase_bptt.evaluation.split import load_split, method_entry

    split = load_split(db, "test").subset([0])
    row = run_baseline(
        b,
        split,
        fmax=FMAX,
        steps=5,
        entry=lambda sp, final, **kw: method_entry(sp, final, metric="dq", basin_rms=0.1, **kw),
        progress=iter,
    )
    assert row["calculator"] == "CHGNetCalculator"
    # CHGNet computes in float32: the same run twice agrees to float32 rounding.
    np.testing.assert_allclose(row["per_structure"], expected, rtol=1e-5)
