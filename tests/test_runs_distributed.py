"""DDP: a 2-process gloo run (torchrun, CPU) takes the same optimiser steps as one process on the same global batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import TINY_MODEL
from conftest import make_cu_db as make_db

DRIVER = r"""
import json, sys, torch
torch.set_num_threads(1)
from ase_bptt.train.finetune import FinetuneConfig, finetune
from ase_bptt.train.pretrain import PretrainConfig, pretrain
db, pre_out, ft_out, init, pre, ft = sys.argv[1:7]
pretrain(db, pre_out, config=PretrainConfig(**json.loads(pre)), progress=False)
finetune(db, ft_out, init=init, config=FinetuneConfig(**json.loads(ft)), progress=False)
"""

PRETRAIN = dict(
    model=TINY_MODEL,
    epochs=1,
    max_steps=1,
    batch_size=8,
    lr=1e-2,
    patience=None,
    eval_frames=9,
    checkpoint_every=None,
    dtype="float64",
    seed=4,
    augment_rotation=True,
    augment_translation=True,
)
# 5 train trajectories in batches of 4: the second batch has one structure, so rank 1 runs a
# zero-weight rollout (same frame count, no gradient) and the step must still equal one process's.
FINETUNE = dict(
    epochs=1,
    batch_size=4,
    lr=1e-3,
    eta=0.05,
    max_steps=15,
    checkpoint_every=None,
    dtype="float64",
    seed=4,
    step="learned",
    step_lr=1e-2,
    tol=1e-3,
    eval_every=None,
    lr_schedule="constant",
    warmup=0,
    # The force term too: 5 reference frames per step, sharded 3 + 2 over the ranks.
    force_weight=0.5,
    force_frames=5,
    energy_weight=0.0,
    # Both relaxations offered on val (sharded rollouts of the export decision too).
    export="auto",
)
TOL = 1e-6  # float64 sums in another order; the brief's bar is 1e-6


@pytest.fixture(scope="module")
def emt_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp") / "emt.db"
    make_db(path, n_train=5, n_val=3, n_test=0, seed=3)
    return path


def close(a: dict, b: dict) -> float:
    """Largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def test_two_process_gloo_step_equals_single_process_step(emt_db, tmp_path):
    from ase_bptt.models.checkpoint import load_checkpoint
    from ase_bptt.runs.state import load_state, state_path
    from ase_bptt.train.finetune import FinetuneConfig, finetune
    from ase_bptt.train.pretrain import PretrainConfig, pretrain

    single_pre = pretrain(emt_db, tmp_path / "pre1.pt", config=PretrainConfig(**PRETRAIN), progress=False)
    single_ft = finetune(
        emt_db, tmp_path / "ft1.pt", init=single_pre, config=FinetuneConfig(**FINETUNE), progress=False
    )
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "--no-python",
            sys.executable,
            "-c",
            DRIVER,
            str(emt_db),
            str(tmp_path / "pre2.pt"),
            str(tmp_path / "ft2.pt"),
            str(single_pre),
            json.dumps(PRETRAIN),
            json.dumps(FINETUNE),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    for single, ddp in ((single_pre, tmp_path / "pre2.pt"), (single_ft, tmp_path / "ft2.pt")):
        s_state, d_state = load_state(state_path(single)), load_state(state_path(ddp))
        assert load_checkpoint(ddp)["metadata"]["world_size"] == 2
        assert s_state["loop"]["step"] == d_state["loop"]["step"] == (1 if single == single_pre else 2)
        # Gradients: Adam's first moment is a fixed linear combination of the gradients of each step.
        s_opt, d_opt = s_state["optimizer"]["state"], d_state["optimizer"]["state"]
        assert s_opt.keys() == d_opt.keys() and len(s_opt) > 0
        for i in s_opt:
            grad = s_opt[i]["exp_avg"]
            assert float(grad.abs().max()) > 0 or i > 0
            assert float((grad - d_opt[i]["exp_avg"]).abs().max()) < TOL * max(1.0, float(grad.abs().max())), (
                single.name,
                i,
                tuple(grad.shape),
            )
        # The step itself: the weights after it agree to 1e-6, and they did move.
        assert close(s_state["model"], d_state["model"]) < TOL
        # Sharded evaluation sums the same numbers.
        for hs, hd in zip(s_state["loop"]["history"], d_state["loop"]["history"]):
            for key, value in hs.items():
                if isinstance(value, float) and key != "elapsed_s":
                    assert hd[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    init = load_checkpoint(single_pre)["model"]["state_dict"]
    assert close(load_state(state_path(single_ft))["model"], init) > 1e-4  # the BPTT step changed the model
    # The learned step size is synchronised too (its own group).
    assert load_state(state_path(tmp_path / "ft2.pt"))["step_rule"]["eta"] == pytest.approx(
        load_state(state_path(single_ft))["step_rule"]["eta"], abs=TOL
    )
    # The export decisions (rollouts sharded over the ranks) are the single process's.
    s_meta, d_meta = (load_checkpoint(p)["metadata"] for p in (single_ft, tmp_path / "ft2.pt"))
    assert s_meta["export"]["chosen"] == d_meta["export"]["chosen"]
    for name, value in s_meta["export"]["val"].items():
        assert d_meta["export"]["val"][name] == pytest.approx(value, rel=1e-9)
    s_rec, d_rec = s_meta["no_harm"], d_meta["no_harm"]
    assert s_rec["exported"] == d_rec["exported"] and s_rec["pretrained_relax"] == d_rec["pretrained_relax"]
    assert d_rec["pretrained_val_dq"] == pytest.approx(s_rec["pretrained_val_dq"], rel=1e-9)
    assert any("train_force_mse" in h for h in load_state(state_path(single_ft))["loop"]["history"])


def test_sync_gradients_sums_and_keeps_unused_parameters_none():
    """Single-process semantics of the helpers (the 2-process run above covers the collectives)."""
    from ase_bptt.runs.distributed import DistContext, shard

    ctx = DistContext()
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([1.0, 2.0])
    ctx.sync_gradients([p, q])
    assert torch.equal(p.grad, torch.tensor([1.0, 2.0])) and q.grad is None
    items = list(range(7))
    parts = [shard(items, r, 3) for r in range(3)]
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]
    assert [shard(items[:1], r, 2) for r in range(2)] == [[0], []]
