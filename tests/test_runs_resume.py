"""Resume: atomic state files, RNG round trips, SIGKILL + resume == uninterrupted run, SIGINT saves state."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL
from conftest import make_cu_db as make_db

# Runs one training in a fresh process with one thread, as the in-process reference does.
DRIVER = r"""
import json, sys, torch
torch.set_num_threads(1)
from ase_bptt.runs.errors import TrainingInterrupted
from ase_bptt.train.finetune import FinetuneConfig, finetune
from ase_bptt.train.pretrain import PretrainConfig, pretrain
kind, db, out, init, options = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] or None, json.loads(sys.argv[5])
try:
    if kind == "pretrain":
        pretrain(db, out, config=PretrainConfig(**options), progress=False)
    else:
        finetune(db, out, init=init, config=FinetuneConfig(**options), progress=False)
except TrainingInterrupted as exc:
    print(exc, file=sys.stderr)
    sys.exit(130)
"""

PRETRAIN = dict(
    model=TINY_MODEL, epochs=2, batch_size=16, lr=1e-2, patience=None, checkpoint_every=3, eval_frames=16, seed=3
)
FINETUNE = dict(
    step="fixed",
    epochs=2,
    batch_size=2,
    lr=1e-3,
    eta=0.05,
    tol=1e-3,
    max_steps=15,
    eval_every=None,
    lr_schedule="constant",
    warmup=0,
    force_weight=0.0,
    energy_weight=0.0,
    export="own",
    refit_energy=False,
    checkpoint_every=None,
    seed=3,
)


def run_driver(kind, db, out, init, options, *, env=None, **kwargs):
    return subprocess.run(
        [sys.executable, "-c", DRIVER, kind, str(db), str(out), str(init or ""), json.dumps(options)],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


@pytest.fixture(scope="module")
def emt_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("resume") / "emt.db"
    make_db(path, n_train=4, n_val=1, n_test=0, seed=2)
    return path


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_state_file_is_atomic_and_loads_weights_only(tmp_path):
    from ase_bptt.runs.state import StateError, load_state, save_state, state_path

    path = state_path(tmp_path / "run" / "si.pt")
    assert path.name == "si.state.pt"
    save_state(path, {"kind": "pretrain", "model": {"w": torch.arange(3.0)}, "loop": {"epoch": 1}})
    assert sorted(p.name for p in path.parent.iterdir()) == ["si.state.pt"]  # no temporary left behind
    state = load_state(path, kind="pretrain")
    assert torch.equal(state["model"]["w"], torch.arange(3.0)) and state["loop"] == {"epoch": 1}
    with pytest.raises(StateError, match="'pretrain' run, not 'finetune'"):
        load_state(path, kind="finetune")
    path.write_bytes(path.read_bytes()[:100])  # truncated by a crash of some other tool
    with pytest.raises(StateError, match="si.state.pt is not a readable"):
        load_state(path)


def test_rng_states_round_trip_through_weights_only_load(tmp_path):
    from ase_bptt.runs.state import get_rng_state, load_state, save_state, set_rng_state

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.normal()  # leaves a cached Gaussian in numpy's legacy state
    save_state(tmp_path / "s.pt", {"rng": get_rng_state()})
    expected = (torch.rand(4), np.random.normal(size=3), [random.random() for _ in range(3)], random.gauss(0, 1))
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    set_rng_state(load_state(tmp_path / "s.pt")["rng"])
    again = (torch.rand(4), np.random.normal(size=3), [random.random() for _ in range(3)], random.gauss(0, 1))
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2] and expected[3] == again[3]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # exact: same ops, same order, one thread


def test_pretrain_killed_and_resumed_ends_at_the_same_weights(emt_db, tmp_path, one_thread):
    from ase_bptt.models.checkpoint import load_checkpoint
    from ase_bptt.runs.loop import KILL_ENV
    from ase_bptt.runs.state import load_state, state_path
    from ase_bptt.train.pretrain import PretrainConfig, pretrain

    reference = pretrain(emt_db, tmp_path / "ref.pt", config=PretrainConfig(**PRETRAIN), progress=False)
    ref_state = load_state(state_path(reference))
    per_epoch = -(-load_checkpoint(reference)["metadata"]["train_frames"] // PRETRAIN["batch_size"])
    assert ref_state["loop"]["step"] == 2 * per_epoch

    out = tmp_path / "killed.pt"
    # Killed right after step k (epoch 2, batch 5); the last state is from the last multiple of
    # checkpoint_every (3) after the epoch end, so at least one step is redone after the resume.
    k = per_epoch + 5
    proc = run_driver("pretrain", emt_db, out, None, PRETRAIN, env={KILL_ENV: str(k)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists()
    saved = load_state(state_path(out))["loop"]
    last = max(per_epoch, 3 * (k // 3))
    assert last < k and (saved["epoch"], saved["batch"], saved["step"]) == (1, last - per_epoch, last)

    pretrain(emt_db, out, config=PretrainConfig(**PRETRAIN), progress=False)  # the same call again
    assert_same_weights(load_state(state_path(out))["model"], ref_state["model"])
    assert_same_weights(load_checkpoint(out)["model"]["state_dict"], load_checkpoint(reference)["model"]["state_dict"])
    assert (
        load_checkpoint(out)["metadata"]["history"][-1]["val_force_mae"]
        == load_checkpoint(reference)["metadata"]["history"][-1]["val_force_mae"]
    )


def test_finetune_killed_and_resumed_ends_at_the_same_weights(emt_db, tmp_path, one_thread):
    from ase_bptt.runs.loop import KILL_ENV
    from ase_bptt.runs.state import load_state, state_path
    from ase_bptt.train.finetune import FinetuneConfig, finetune
    from ase_bptt.train.pretrain import PretrainConfig, pretrain

    init = pretrain(emt_db, tmp_path / "init.pt", config=PretrainConfig(**dict(PRETRAIN, epochs=1)), progress=False)
    reference = finetune(emt_db, tmp_path / "ref.pt", init=init, config=FinetuneConfig(**FINETUNE), progress=False)
    ref_state = load_state(state_path(reference))
    assert ref_state["loop"]["step"] == 4

    out = tmp_path / "killed.pt"
    # No periodic states: the last one is from the end of epoch 1 (step 2), so step 3 is redone.
    proc = run_driver("finetune", emt_db, out, init, FINETUNE, env={KILL_ENV: "3"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    saved = load_state(state_path(out))["loop"]
    assert (saved["epoch"], saved["batch"], saved["step"]) == (1, 0, 2)
    assert [h["epoch"] for h in saved["history"]] == [0, 1]

    finetune(emt_db, out, init=init, config=FinetuneConfig(**FINETUNE), progress=False)
    state = load_state(state_path(out))
    assert_same_weights(state["model"], ref_state["model"])
    assert_same_weights(state["optimizer"]["state"][0], ref_state["optimizer"]["state"][0])
    assert [h["val_dq"] for h in state["loop"]["history"]] == [h["val_dq"] for h in ref_state["loop"]["history"]]


@pytest.fixture(scope="module")
def cubic_db(tmp_path_factory):
    """Cubic EMT Cu cells (1x1x1, one vacancy), so augment_cubic moves them."""
    from conftest import emt_cu_relaxation

    from ase_bptt.data.db import TrajectoryDB

    path = tmp_path_factory.mktemp("resume-cubic") / "cubic.db"
    db = TrajectoryDB(path)
    for k, split in enumerate(["train"] * 4 + ["val"]):
        db.add_trajectory(emt_cu_relaxation(70 + k, repeat=(1, 1, 1)), label="vacancy", source="test", split=split)
    return path


def test_finetune_with_controls_killed_after_a_mid_epoch_evaluation_resumes_exactly(cubic_db, tmp_path, one_thread):
    from ase_bptt.runs.loop import KILL_ENV
    from ase_bptt.runs.state import load_state, state_path
    from ase_bptt.train.finetune import FinetuneConfig, finetune
    from ase_bptt.train.pretrain import PretrainConfig, pretrain

    options = dict(
        FINETUNE,
        eval_every=3,
        patience=5,
        lr_schedule="cosine",
        warmup=1,
        augment_translation=True,
        augment_cubic=True,
    )
    init = pretrain(cubic_db, tmp_path / "init.pt", config=PretrainConfig(**dict(PRETRAIN, epochs=1)), progress=False)
    reference = finetune(cubic_db, tmp_path / "ref.pt", init=init, config=FinetuneConfig(**options), progress=False)
    ref_state = load_state(state_path(reference))
    # 2 steps per epoch: evaluations at step 3 (half-way through epoch 2) and at the end.
    assert [h["epoch"] for h in ref_state["loop"]["history"]] == [0, 1.5, 2]

    out = tmp_path / "killed.pt"
    # The last state is the one written right after the evaluation at step 3.
    proc = run_driver("finetune", cubic_db, out, init, options, env={KILL_ENV: "3"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    saved = load_state(state_path(out))["loop"]
    assert (saved["epoch"], saved["batch"], saved["step"]) == (1, 1, 3)
    assert [h["epoch"] for h in saved["history"]] == [0, 1.5]

    finetune(cubic_db, out, init=init, config=FinetuneConfig(**options), progress=False)
    state = load_state(state_path(out))
    assert_same_weights(state["model"], ref_state["model"])
    assert_same_weights(state["optimizer"]["state"][0], ref_state["optimizer"]["state"][0])
    assert state["optimizer"]["param_groups"][0]["lr"] == ref_state["optimizer"]["param_groups"][0]["lr"]
    assert [h["val_dq"] for h in state["loop"]["history"]] == [h["val_dq"] for h in ref_state["loop"]["history"]]
    assert state["loop"]["best_epoch"] == ref_state["loop"]["best_epoch"]


def test_sigint_saves_the_state_and_says_how_to_resume(emt_db, tmp_path):
    from ase_bptt.runs.errors import ConfigMismatchError
    from ase_bptt.runs.state import load_state, state_path
    from ase_bptt.train.pretrain import PretrainConfig, pretrain

    out = tmp_path / "int.pt"
    options = dict(PRETRAIN, epochs=50, batch_size=4, checkpoint_every=1)
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, "pretrain", str(emt_db), str(out), "", json.dumps(options)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not state_path(out).exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted at epoch" in stderr and "Run the same command again to continue" in stderr
    loop = load_state(state_path(out))["loop"]
    assert loop["step"] >= 1 and not loop["finished"]
    assert not out.exists()
    # The state belongs to this config: another one is refused rather than mixed.
    with pytest.raises(ConfigMismatchError, match="batch_size: 4 -> 8"):
        pretrain(emt_db, out, config=PretrainConfig(**dict(options, batch_size=8)), progress=False)


# ------------------------------------------------------- a state file that cannot be read is not always damaged
def test_an_unreadable_state_file_is_never_called_damaged(tmp_path, monkeypatch):
    import torch

    from ase_bptt.runs.state import StateError, load_state, save_state

    path = save_state(tmp_path / "m.state.pt", {"kind": "finetune"})

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(StateError) as info:
        load_state(path)
    assert "Delete" not in str(info.value) and "resume" in str(info.value)


@pytest.mark.parametrize("content", [b"", b"not a state file", b"PK\x03\x04 truncated zip"])
def test_a_damaged_state_file_says_what_to_do(tmp_path, content):
    from ase_bptt.runs.state import StateError, load_state

    path = tmp_path / "m.state.pt"
    path.write_bytes(content)
    with pytest.raises(StateError, match="Delete it to start the run from scratch"):
        load_state(path)


def test_a_bug_while_loading_a_state_keeps_its_traceback(tmp_path, monkeypatch):
    import torch

    from ase_bptt.runs.state import load_state, save_state

    path = save_state(tmp_path / "m.state.pt", {"kind": "finetune"})
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(TypeError("a bug")))
    with pytest.raises(TypeError, match="a bug"):
        load_state(path)
