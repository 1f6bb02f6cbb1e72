"""The step-rule registry: names, checkpoint round trips, and a new rule added as one class plus its registration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase.io import read, write
from click.testing import CliRunner
from conftest import tiny_adapt
from torch import nn

from ase_bptt import BPTTCalculator, DifferentiableRelaxer, LearnedStepOptimizer
from ase_bptt.batch import Batch
from ase_bptt.cli import cli
from ase_bptt.models.checkpoint import load_checkpoint, save_checkpoint
from ase_bptt.relax.registry import register_step_rule, step_rule_names, unregister_step_rule
from ase_bptt.relax.rollout import rollout
from ase_bptt.relax.steps import (
    DecoderStep,
    FixedStep,
    make_step_rule,
    relax_settings,
    rule_from_relax_settings,
    step_rule_from_dict,
)

POSITION_ATOL = 1e-6  # A: LearnedStepOptimizer (float64) against DifferentiableRelaxer


@pytest.fixture
def batch(si_small):
    return Batch.from_atoms(si_small)


# ----------------------------------------------------------- serialisation
@pytest.mark.parametrize("spec", ["fixed", "learned", "decoder", "fire"])
def test_to_dict_round_trip(spec, batch):
    rule = make_step_rule(spec, maxstep=0.15, noise=0.0)
    if spec == "decoder":
        rule = DecoderStep(0.05, dtype=torch.float64, momentum=0.05, anneal=0.99)
        nn.init.normal_(rule.head.weight, std=0.3)
    if spec == "learned":
        with torch.no_grad():
            rule.log_eta.fill_(math.log(0.0612345))
    settings = relax_settings(rule, tol=2e-3, max_steps=50)
    saved = torch.load(_save(settings), weights_only=True)
    again, tol, max_steps = rule_from_relax_settings(saved)
    assert (tol, max_steps) == (2e-3, 50)
    assert type(again) is type(rule)
    forces = torch.randn(batch.positions.shape, dtype=torch.float64) * batch.movable[..., None]
    state = rule.init_state(batch, batch.positions)
    u1, _ = rule(batch.positions, forces, batch, state, 3)
    u2, _ = again(batch.positions, forces, batch, again.init_state(batch, batch.positions), 3)
    torch.testing.assert_close(u1, u2, rtol=0, atol=0)


def _save(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_flat_relax_dict_and_unknown_rule():
    rule, tol, _ = rule_from_relax_settings({"step": "fixed", "eta": 0.03, "tol": 1e-4})
    assert isinstance(rule, FixedStep) and rule.eta == 0.03 and tol == 1e-4
    with pytest.raises(ValueError, match="unknown step rule 'bfgs'"):
        step_rule_from_dict({"step": "bfgs"})
    with pytest.raises(ValueError, match="momentum"):
        FixedStep(0.1, momentum=1.5)
    with pytest.raises(ValueError, match="FIRE takes no eta"):
        make_step_rule("fire", eta=0.1)


def test_checkpoint_keys_unchanged():
    """Checkpoints written before the registry load: every rule's dict keeps its keys, in order."""
    keys = {
        "fixed": ["step", "eta", "momentum", "anneal", "noise", "maxstep"],
        "learned": ["step", "eta", "log_eta", "momentum", "anneal", "noise", "maxstep"],
        "decoder": ["step", "eta", "d_model", "n_heads", "d_ff", "dropout", "force_scale", "length_scale"]
        + ["momentum", "anneal", "noise", "maxstep", "state_dict"],
        "fire": ["step", "dt", "maxstep", "dtmax", "Nmin", "finc", "fdec", "astart", "fa", "a", "noise"],
    }
    assert step_rule_names() == tuple(keys)
    for name, expected in keys.items():
        assert list(make_step_rule(name).to_dict()) == expected


# ------------------------------------------------ a new rule: one class plus its registration
class HalvingStep(FixedStep):
    """A toy rule: a fixed step that halves every frame, ``eta_k = eta / 2**k``."""

    name = "halving"

    def step_size(self, positions, forces, batch, state, frame):
        return self.eta * 0.5**frame


@pytest.fixture
def halving():
    """Register the toy rule for one test only."""
    register_step_rule(HalvingStep)
    yield HalvingStep
    unregister_step_rule(HalvingStep.name)
    assert HalvingStep.name not in step_rule_names()


def test_registering_a_rule_reaches_every_entry_point(halving, tmp_path, si_small):
    """rollout, DifferentiableRelaxer, the checkpoint, LearnedStepOptimizer and `ase-bptt relax` all take it."""
    model = tiny_adapt(force_scale=30.0)
    batch = Batch.from_atoms(si_small)
    rule = make_step_rule("halving", eta=0.02)
    assert type(rule) is HalvingStep
    # rollout: the same numbers as the built-in fixed step annealed by 0.5 (an independent spelling)
    with torch.no_grad():
        ours = rollout(model, batch, rule, tol=None, max_steps=5)
        annealed = rollout(model, batch, FixedStep(0.02, anneal=0.5), tol=None, max_steps=5)
    torch.testing.assert_close(ours.positions, annealed.positions, rtol=0, atol=0)
    assert not torch.equal(ours.positions, batch.positions)

    # checkpoint round trip: saved by name, rebuilt equal
    path = save_checkpoint(tmp_path / "halving.pt", model, relax=relax_settings(rule, tol=1e-4, max_steps=40))
    again, tol, max_steps = rule_from_relax_settings(load_checkpoint(path)["relax"])
    assert type(again) is HalvingStep and again.to_dict() == rule.to_dict() and (tol, max_steps) == (1e-4, 40)

    # DifferentiableRelaxer (by name and from the checkpoint) and LearnedStepOptimizer agree
    with torch.no_grad():
        by_name = DifferentiableRelaxer(si_small, model, step="halving", eta=0.02, tol=1e-4)
        assert by_name.run(steps=40) is True
        from_ckpt = DifferentiableRelaxer(si_small, str(path))
        assert type(from_ckpt.step_rule) is HalvingStep and from_ckpt.run() is True
    assert by_name.nsteps == from_ckpt.nsteps < 40
    torch.testing.assert_close(by_name.positions, from_ckpt.positions, rtol=0, atol=0)
    expected = by_name.get_atoms()[0].positions
    atoms = si_small.copy()
    atoms.calc = BPTTCalculator(path, dtype=torch.float64)
    opt = LearnedStepOptimizer(atoms, logfile=None)
    assert type(opt.step_rule) is HalvingStep and opt.run() is True and opt.nsteps == by_name.nsteps
    np.testing.assert_allclose(atoms.positions, expected, rtol=0, atol=POSITION_ATOL)

    # the command line: relax a file with that checkpoint, and finetune lists the rule
    write(tmp_path / "in.extxyz", si_small)
    args = ["relax", str(tmp_path / "in.extxyz"), "--model", str(path), "-o", str(tmp_path / "out.extxyz")]
    result = CliRunner().invoke(cli, ["--quiet", *args, "--dtype", "float64"])
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(read(tmp_path / "out.extxyz").positions, expected, rtol=0, atol=POSITION_ATOL)
    help_text = CliRunner().invoke(cli, ["finetune", "--help"], terminal_width=200).output
    assert "fixed|learned|decoder|fire|halving" in help_text
