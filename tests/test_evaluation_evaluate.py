"""evaluate(): report files, and every number checked against an independent computation.

The data are tiny EMT copper relaxations (7-atom cells) made here, so the test
does not depend on the built-in generators; the model is a small untrained
ADAPT with fitted standardisation (an untrained model is enough: the checks
are about bookkeeping, not accuracy).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.geometry import find_mic
from ase.optimize import FIRE

from ase_bptt.batch import Batch
from ase_bptt.data.db import TrajectoryDB
from ase_bptt.data.generate import relax_frames
from ase_bptt.evaluation.pipeline import DEFAULT_ETA_GRID, EmptySplitError, evaluate
from ase_bptt.evaluation.rows import PLOT_FILES
from ase_bptt.models.adapt import ADAPT, ADAPTConfig
from ase_bptt.models.checkpoint import save_checkpoint
from ase_bptt.relax.steps import FixedStep, relax_settings

#: Same numbers computed twice in float64 (different summation order only).
TIGHT = 1e-9
#: ASE FIRE driven twice by the same float64 model.
FIRE_TOL = 1e-6
#: An untrained model predicts small forces; a tight fmax makes FIRE take steps.
FIRE_FMAX = 1e-3
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SPLITS = {"train": 3, "val": 2, "test": 3}


def emt_relaxation(seed: int, *, vacancy: bool) -> list:
    """Frames of an EMT FIRE relaxation of a rattled 8-site Cu cell (7 atoms with a vacancy).

    The cell is orthorhombic, where the fractional-rounding minimum image of
    ``metrics.dq`` is exact for any displacement (an untrained model can move
    atoms further than half a skewed cell's height).
    """
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 1, 1)
    if vacancy:
        del atoms[0]
    rng = np.random.default_rng(seed)
    atoms.positions += rng.normal(scale=0.06, size=atoms.positions.shape)
    return relax_frames(atoms, EMT(), fmax=0.03, max_steps=400)


def make_db(path, splits: dict[str, int] = SPLITS) -> TrajectoryDB:
    """A TrajectoryDB with EMT Cu relaxations, the given number per split, two labels."""
    db = TrajectoryDB(path, create=True)
    seed = 0
    for split, n in splits.items():
        for _ in range(n):
            vacancy = seed % 2 == 0
            db.add_trajectory(
                emt_relaxation(seed, vacancy=vacancy),
                label="vacancy" if vacancy else "rattled",
                source="test",
                split=split,
            )
            seed += 1
    return db


def make_checkpoint(
    path,
    db: TrajectoryDB,
    *,
    eta: float = 0.02,
    tol: float = 1e-3,
    max_steps: int = 75,
    history: bool = True,
    step_rule: bool = True,
    seed: int = 0,
    species: tuple[int, ...] = (29,),
):
    """A small ADAPT (species Cu unless given) with standardisation fitted on the db's frames, saved with a fixed-step rule."""
    torch.manual_seed(seed)
    model = ADAPT(ADAPTConfig(d_model=16, d_ff=32, n_layers=1, n_heads=2, species=species))
    frames = [a for t in db.trajectories(converged_only=False) for a in t.frames][:64]
    batch = Batch.from_atoms(frames)
    forces = torch.zeros_like(batch.positions)
    for i, a in enumerate(frames):
        forces[i, : len(a)] = torch.from_numpy(a.get_forces())
    energy = torch.tensor([a.get_potential_energy() for a in frames], dtype=torch.float64)
    model.fit_standardisation(batch, forces, energy)
    meta = {}
    if history:
        meta["history"] = [
            {"epoch": e, "train_force_mae": 1.0 / (e + 1), "val_force_mae": 1.2 / (e + 1)} for e in range(4)
        ]
    relax = relax_settings(FixedStep(eta, maxstep=0.2), tol=tol, max_steps=max_steps)
    return save_checkpoint(path, model, relax=relax if step_rule else None, metadata=meta)


def independent_dq(final_positions: np.ndarray, reference, masses=None) -> float:
    """Dq with ASE's own minimum image convention, in NumPy."""
    d, _ = find_mic(final_positions - reference.positions, reference.cell, reference.pbc)
    m = reference.get_masses() if masses is None else masses
    return float(np.sqrt((m * (d * d).sum(1)).sum()))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    db = make_db(root / "cu.db")
    ckpt = make_checkpoint(root / "cu.pt", db, max_steps=40)
    return root, db, ckpt


@pytest.fixture(scope="module")
def result(tiny):
    root, db, ckpt = tiny
    return evaluate(
        [ckpt],
        db,
        root / "report",
        eta_grid=[0.005, 0.02, 0.08],
        fire_fmax=FIRE_FMAX,
        fire_steps=25,
        max_steps=40,
        dtype="float64",
        device="cpu",
        progress=False,
    )


def test_writes_every_report_file(tiny, result):
    root = tiny[0] / "report"
    assert (root / "report.md").read_text().startswith("# ase-bptt evaluation report")
    on_disk = json.loads((root / "report.json").read_text())
    assert on_disk["do_nothing"] == json.loads(json.dumps(result["do_nothing"]))
    assert on_disk["n_structures"] == SPLITS["test"]
    for name in PLOT_FILES.values():
        data = (root / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000, name
    md = (root / "report.md").read_text()
    for name in PLOT_FILES.values():
        assert f"({name})" in md
    assert "perfect information" in md


def test_do_nothing_matches_independent_dq(tiny, result):
    _, db, _ = tiny
    trajs = db.trajectories(split="test")
    expected = [independent_dq(t.frames[0].positions, t.frames[-1]) for t in trajs]
    assert len(expected) == SPLITS["test"]
    np.testing.assert_allclose(result["do_nothing"]["per_structure"], expected, rtol=TIGHT)
    assert result["do_nothing"]["dq"]["mean"] == pytest.approx(np.mean(expected), rel=TIGHT)
    assert result["do_nothing"]["dq"]["median"] == pytest.approx(np.median(expected), rel=TIGHT)
    labels = [t.label for t in trajs]
    per_label = result["do_nothing"]["dq"]["per_label"]
    for lab in set(labels):
        vals = [e for e, l in zip(expected, labels) if l == lab]
        assert per_label[lab]["n"] == len(vals)
        assert per_label[lab]["mean"] == pytest.approx(np.mean(vals), rel=TIGHT)


def test_fire_matches_ase_fire_run_here(tiny, result):
    from ase_bptt.calculator import BPTTCalculator

    _, db, ckpt = tiny
    t = db.trajectories(split="test")[1]
    atoms = t.frames[0].copy()
    atoms.calc = BPTTCalculator(ckpt, device="cpu", dtype=torch.float64)
    opt = FIRE(atoms, logfile=None)
    opt.run(fmax=FIRE_FMAX, steps=25)
    fire = result["checkpoints"][0]["fire"]
    assert fire["per_structure"][1] == pytest.approx(independent_dq(atoms.positions, t.frames[-1]), abs=FIRE_TOL)
    assert fire["fmax"] == FIRE_FMAX and fire["max_steps"] == 25
    assert 1 <= fire["steps_mean"] <= 25


def test_eta_choices_are_consistent(result):
    ck = result["checkpoints"][0]
    curve = ck["eta_curve"]
    assert [p["eta"] for p in curve] == [0.005, 0.02, 0.08]
    best = min(curve, key=lambda p: p["dq"]["mean"])
    pi = ck["fixed_step_perfect_information"]
    assert pi["eta"] == best["eta"] and pi["chosen_on"] == "test"
    assert pi["dq"]["mean"] == pytest.approx(best["dq"]["mean"], rel=TIGHT)
    assert np.mean(pi["per_structure"]) == pytest.approx(pi["dq"]["mean"], rel=TIGHT)
    sel = ck["fixed_step_selected"]
    assert sel["chosen_on"] == "val" and result["selection_split"] == "val"
    val_curve = ck["selection_eta_curve"]
    assert sel["eta"] == min(val_curve, key=lambda p: p["dq"]["mean"])["eta"]
    at = next(p for p in curve if p["eta"] == sel["eta"])
    assert sel["dq"]["mean"] == pytest.approx(at["dq"]["mean"], rel=TIGHT)
    # Perfect information can only be as good or better on its own split.
    assert pi["dq"]["mean"] <= sel["dq"]["mean"] + TIGHT
    for p in curve:
        assert 1 <= p["frames_mean"] <= 40


def test_own_rule_equals_the_same_fixed_step(result):
    # The checkpoint stores FixedStep(0.02) with the evaluation's tol and max_steps,
    # so its own-rule rollout must reproduce the eta curve's 0.02 point.
    ck = result["checkpoints"][0]
    own = ck["own_rule"]
    assert own["eta"] == pytest.approx(0.02)
    at = next(p for p in ck["eta_curve"] if p["eta"] == 0.02)
    assert own["dq"]["mean"] == pytest.approx(at["dq"]["mean"], rel=TIGHT)
    assert own["frames_mean"] == at["frames_mean"]


def test_force_errors_match_numpy(tiny, result):
    from ase_bptt.calculator import BPTTCalculator

    _, db, ckpt = tiny
    calc = BPTTCalculator(ckpt, device="cpu", dtype=torch.float64)
    abs_sum = sq_sum = n = 0.0
    l2 = []
    frames = [a for t in db.trajectories(split="test", converged_only=False) for a in t.frames]
    for a in frames:
        b = a.copy()
        b.calc = calc
        diff = b.get_forces() - a.get_forces()
        abs_sum += np.abs(diff).sum()
        sq_sum += (diff**2).sum()
        n += diff.size
        l2.append(np.sqrt((diff**2).sum()))
    f = result["checkpoints"][0]["forces"]
    assert f["n_frames"] == len(frames)
    assert f["mae"] == pytest.approx(abs_sum / n, rel=1e-6)
    assert f["rmse"] == pytest.approx(math.sqrt(sq_sum / n), rel=1e-6)
    assert f["l2"] == pytest.approx(np.mean(l2), rel=1e-6)
    assert f["energy_mae_mev_per_atom"] is not None and f["energy_mae_mev_per_atom"] >= 0


def test_default_eta_grid_is_log_spaced():
    g = np.array(DEFAULT_ETA_GRID)
    assert g[0] == pytest.approx(0.005) and g[-1] == pytest.approx(0.3)
    ratios = g[1:] / g[:-1]
    np.testing.assert_allclose(ratios, ratios.mean(), rtol=0.01)


def test_empty_split_is_a_clear_error(tmp_path):
    db = make_db(tmp_path / "no-test.db", {"train": 1, "val": 1})
    ckpt = make_checkpoint(tmp_path / "m.pt", db)
    with pytest.raises(EmptySplitError, match="split 'test'.*no converged trajectories"):
        evaluate([ckpt], db, tmp_path / "r", progress=False)


def test_missing_checkpoint_is_a_clear_error(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        evaluate([tmp_path / "nope.pt"], tiny[1], tmp_path / "r", progress=False)


def test_an_empty_val_split_is_said_in_the_console_and_the_report(tmp_path):
    from click.testing import CliRunner

    from ase_bptt.cli import cli

    db = make_db(tmp_path / "noval.db", {"train": 2, "val": 0, "test": 2})
    ckpt = make_checkpoint(tmp_path / "m.pt", db)
    common = ["-q", "evaluate", str(ckpt), "--db", str(db.name), "--eta-grid", "0.01,0.05", "--no-plots"]
    cases = {
        "test": "the val split has no converged trajectories: the fixed-step eta is chosen on train",
        "train": "the val split has no converged trajectories; train is the evaluated split: no fixed-step baseline "
        "with an eta chosen on another split",
    }
    for split, note in cases.items():
        out = tmp_path / split
        result = CliRunner().invoke(cli, [*common, "--split", split, "-o", str(out)])
        assert result.exit_code == 0, result.output
        assert f"Warning: {note}" in result.output  # -q keeps warnings
        assert note in (out / "report.md").read_text()
        report = json.loads((out / "report.json").read_text())
        assert report["selection_note"].startswith(note)
        assert report["selection_split"] == ("train" if split == "test" else None)
