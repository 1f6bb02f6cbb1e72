"""``--init chgnet``: pretraining and fine-tuning start from a universal MLIP's shipped weights, from the CLI.

CHGNet 0.3.0 (its wheel ships the weights) on 8-atom silicon cells relaxed with
Stillinger-Weber, with a few optimiser steps: the plumbing, not the gain
(docs/results.md has the measured run).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_evaluation_baselines import silicon_relaxation

from ase_bptt.cli import cli
from ase_bptt.data.db import TrajectoryDB
from ase_bptt.data.recipes import stillinger_weber
from ase_bptt.models.checkpoint import load_checkpoint, load_model
from ase_bptt.models.universal import UniversalInit, UniversalModel, load_universal_model, universal_init

pytest.importorskip("chgnet")  # CI installs the extra (pyproject's test extra); skipped only without it

#: Settings that keep CHGNet runs to seconds: one process, tiny batches, short rollouts.
QUICK = ["--workers", "1", "--seed", "0", "--dtype", "float64"]


def test_init_names_a_backend_or_a_file(tmp_path, monkeypatch):
    assert universal_init("chgnet") == UniversalInit("chgnet")
    assert universal_init("sevenn") == UniversalInit("sevenn") and universal_init("CHGNet") == UniversalInit("chgnet")
    assert universal_init("chgnet:0.3.0") == UniversalInit("chgnet", "0.3.0")
    assert str(UniversalInit("chgnet", "0.3.0")) == "chgnet:0.3.0"
    assert universal_init("nosuchmodel") is None and universal_init(None) is None
    assert universal_init(Path("chgnet")) is None  # a Path is always a file
    monkeypatch.chdir(tmp_path)
    Path("chgnet").write_bytes(b"")
    assert universal_init("chgnet") is None  # an existing file of that name wins


@pytest.fixture(scope="module")
def silicon(tmp_path_factory):
    root = tmp_path_factory.mktemp("universal")
    db = TrajectoryDB(root / "si.db", create=True)
    calc = stillinger_weber()
    for seed, split in enumerate(["train", "train", "val", "test"]):
        db.add_trajectory(silicon_relaxation(seed, calc), label="vacancy", source="test", split=split)
    return root


def run(*args: str) -> str:
    res = CliRunner().invoke(cli, ["--quiet", *args])
    assert res.exit_code == 0, res.output
    return res.output


def test_pretrain_then_finetune_from_chgnet_and_evaluate(silicon):
    root = silicon
    db = str(root / "si.db")
    run(
        "pretrain",
        db,
        "--init",
        "chgnet",
        "-o",
        str(root / "base.pt"),
        "--train-steps",
        "2",
        "--batch-size",
        "2",
        *QUICK,
    )
    base = load_model(root / "base.pt")
    assert isinstance(base, UniversalModel) and base.config.model == "0.3.0"
    untouched = load_universal_model("chgnet", dtype=torch.float64)
    moved = [
        (a - b).abs().max().item()
        for a, b in zip(base.state_dict().values(), untouched.state_dict().values())
        if a.is_floating_point()
    ]
    assert max(moved) > 0  # force matching moved the weights from CHGNet's
    meta = load_checkpoint(root / "base.pt")["metadata"]
    assert meta["init"] == "chgnet" and meta["init_digest"].startswith("chgnet:0.3.0:")

    args = ["--train-steps", "2", "--batch-size", "1", "--step", "fixed", "--eta", "0.01", "--max-steps", "4"]
    args += ["--eval-every", "1", "--export", "own", *QUICK]
    run("finetune", db, "--init", str(root / "base.pt"), "-o", str(root / "tuned.pt"), *args)
    tuned = load_model(root / "tuned.pt")
    assert isinstance(tuned, UniversalModel) and tuned.config.base_sha256 == base.config.base_sha256

    out = run(
        "evaluate",
        str(root / "base.pt"),
        str(root / "tuned.pt"),
        "--db",
        db,
        "-o",
        str(root / "report"),
        "--no-plots",
        "--eta-grid",
        "0.01",
        "--max-steps",
        "4",
        "--fire-steps",
        "5",
        "--dtype",
        "float64",
    )
    report = json.loads((root / "report" / "report.json").read_text())
    assert [b["name"] for b in report["baselines"]] == ["chgnet 0.3.0 (untouched)"]
    for ck in report["checkpoints"]:
        assert ck["forgetting"]["against"] == "chgnet 0.3.0 (untouched)" and ck["forgetting"]["n_structures"] == 10
        assert ck["forgetting"]["mean"] > 0
        assert f"{ck['name']}: forgetting: |F - F_base|" in out


def test_finetune_straight_from_chgnet_and_a_rerun_finds_it_done(silicon):
    root = silicon
    db = str(root / "si.db")
    args = ["--train-steps", "1", "--batch-size", "1", "--step", "fixed", "--eta", "0.01", "--max-steps", "3"]
    args += ["--export", "own", *QUICK]
    out = root / "direct.pt"
    run("finetune", db, "--init", "chgnet", "-o", str(out), *args)
    assert not (root / "direct-pretrained.pt").exists()  # no pretraining of its own
    assert isinstance(load_model(out), UniversalModel)
    mtime = out.stat().st_mtime_ns
    run("finetune", db, "--init", "chgnet", "-o", str(out), *args)
    assert out.stat().st_mtime_ns == mtime  # same run identity (backend, weights): nothing to do


def test_an_unknown_init_is_one_line(silicon):
    res = CliRunner().invoke(
        cli, ["finetune", str(silicon / "si.db"), "--init", "nosuch", "-o", str(silicon / "x.pt"), "--workers", "1"]
    )
    assert res.exit_code != 0
    assert "initial model nosuch does not exist" in res.output and "chgnet" in res.output
    assert not (silicon / "x.pt").exists()


def test_energy_reference_fit_is_exact_for_a_constant_per_atom_offset(tmp_path):
    from conftest import silicon_vacancy, small_backend

    from ase_bptt.batch import Batch
    from ase_bptt.models.checkpoint import save_checkpoint

    model = small_backend("chgnet")
    cells = [silicon_vacancy(repeat=1, rattle=0.1, seed=s) for s in range(11)]  # two passes of ENERGY_FIT_CHUNK frames
    batch = Batch.from_atoms(cells, dtype=torch.float64)
    before = model(batch)
    reference = before.energy.detach() + 2.5 * batch.mask.sum(1)  # the data's zero: 2.5 eV per atom higher
    fit = model.fit_energy_reference(batch, reference)
    after = model(batch)
    assert model.energy_reference[14].item() == pytest.approx(2.5, rel=1e-12)
    assert fit["mae_after"] == pytest.approx(0.0, abs=1e-9) and fit["mae_before"] == pytest.approx(2500.0)
    torch.testing.assert_close(after.energy, reference, rtol=0, atol=1e-10)
    torch.testing.assert_close(after.forces, before.forces, rtol=0, atol=0)  # forces never read it
    loaded = load_model(save_checkpoint(tmp_path / "m.pt", model))
    assert loaded.energy_reference[14].item() == pytest.approx(2.5, rel=1e-12)


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_an_option_given_with_the_default_recipes_value_stays_the_users(silicon, monkeypatch, command):
    """--init chgnet switches to the universal recipe, but --lr 5e-4 (the default recipe's lr) is the user's."""
    import ase_bptt.train.finetune as finetune_module
    import ase_bptt.train.pretrain as pretrain_module
    from ase_bptt.train.presets import TRAINING_RECIPES

    seen = {}

    def capture(db, out, *, config, **kwargs):
        seen["config"] = config
        return Path(out)

    module = pretrain_module if command == "pretrain" else finetune_module
    monkeypatch.setattr(module, command, capture)
    db, out = str(silicon / "si.db"), str(silicon / "never.pt")
    run(command, db, "--init", "chgnet", "-o", out, "--lr", "5e-4")
    universal = getattr(TRAINING_RECIPES["universal"], command)
    assert seen["config"].recipe == "universal" and seen["config"].lr == 5e-4 != universal["lr"]
    assert seen["config"].batch_size == universal["batch_size"]  # the rest from the universal recipe
    run(command, db, "--init", "chgnet", "-o", out, "--recipe", "default")
    assert seen["config"].recipe == "default"
