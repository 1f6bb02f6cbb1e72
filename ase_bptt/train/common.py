"""What pretrain and finetune share: config hashing, the resumable epoch loop,
learning-rate schedules, interrupts and small tensor helpers.

The loop is written once (:func:`run_epochs`) so both trainings resume the same
way: the order of the batches in an epoch is a pure function of
``(seed, epoch)``, so a resumed epoch skips exactly the batches already done;
every random draw inside a batch comes from a generator seeded with
``(seed, epoch, batch)``; the global RNG states (dropout) travel in the state
file. A state is written atomically every ``checkpoint_every`` batches, at the
end of each epoch, on SIGINT and when a time budget or step limit stops the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ase_bptt.errors import AseBpttError
from ase_bptt.train.distributed import DistContext, shard
from ase_bptt.train.state import StateError, get_rng_state, save_state, set_rng_state

__all__ = [
    "TrainingError",
    "TrainingInterrupted",
    "ConfigMismatchError",
    "EmptySplitError",
    "LoopState",
    "LoopSpec",
    "run_epochs",
    "config_to_dict",
    "config_hash",
    "fingerprint",
    "lr_factor",
    "resolve_dtype",
    "open_db",
    "seed_generator",
    "KILL_ENV",
    "RUN_CONTROL",
    "run_header",
    "start_or_resume",
]

log = logging.getLogger("ase_bptt.train")

#: Config fields that may change between a run and its resumption (they steer
#: the run, not its result).
RUN_CONTROL = frozenset({"device", "time_budget", "checkpoint_every", "eval_batch_size"})

#: Hidden test hook: a run SIGKILLs itself right after this many optimiser steps.
KILL_ENV = "ASE_BPTT_TEST_KILL_AFTER_STEP"


class TrainingError(AseBpttError, RuntimeError):
    """Training cannot go on (e.g. every batch was non-finite)."""


class TrainingInterrupted(AseBpttError, RuntimeError):
    """SIGINT stopped the run after the state was saved; the message says how to resume."""


class ConfigMismatchError(StateError):
    """An output or state file belongs to another configuration or database."""


class EmptySplitError(AseBpttError, ValueError):
    """A split the run needs holds no data."""


# --------------------------------------------------------------------- config
def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return _jsonable(value.to_dict())
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (torch.device, Path)):
        return str(value)
    return value


def config_to_dict(config: Any) -> dict:
    """A config dataclass as a JSON-like dict (tuples become lists)."""
    return _jsonable(config)


def config_hash(config_dict: dict, *, ignore: frozenset[str] | set[str] = frozenset()) -> str:
    """sha256 of the config without run-control fields (device, time budget, ...)."""
    kept = {k: v for k, v in config_dict.items() if k not in ignore}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(traj_ids: list[str]) -> str:
    """Training-data fingerprint: sha256 of the sorted trajectory ids."""
    return hashlib.sha256("\n".join(sorted(traj_ids)).encode()).hexdigest()[:16]


def config_differences(old: dict, new: dict, *, ignore=frozenset(), prefix: str = "") -> list[str]:
    """Human-readable list of the fields that differ between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        if key in ignore:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, prefix=f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """ "float32"/"float64" (or a torch dtype) to a torch floating dtype; None is float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "float": torch.float32, "float64": torch.float64, "double": torch.float64}
    if dtype not in table:
        raise ValueError(f"dtype must be 'float32' or 'float64', not {dtype!r}.")
    return table[dtype]


def open_db(db):
    """A TrajectoryDB from an instance or a path (which must exist)."""
    from ase_bptt.data.db import TrajectoryDB

    if isinstance(db, TrajectoryDB):
        return db
    text = str(db)
    if "://" not in text and not Path(text).exists():
        raise FileNotFoundError(
            f"database {text} does not exist; create one with `ase-bptt generate` or `ase-bptt import`."
        )
    return TrajectoryDB(text, create=False)


def seed_generator(*parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch Generator seeded from a tuple of ints (e.g. seed, epoch, batch)."""
    h = hashlib.sha256(json.dumps([int(p) for p in parts]).encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(h[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return g


# ------------------------------------------------------------------ schedules
def lr_factor(
    step: int, total: int, *, schedule: str, warmup: int, min_factor: float = 0.0, div_factor: float = 25.0
) -> float:
    """Learning-rate multiplier for optimiser step ``step`` (0-based) of ``total``.

    ``constant``: linear warmup then 1. ``cosine``: linear warmup from 0 to 1
    over ``warmup`` steps, then cosine decay to ``min_factor``. ``onecycle``:
    cosine rise from ``1/div_factor`` to 1 over ``warmup`` steps, then cosine
    decay to ``min_factor`` (torch's OneCycleLR shape, without momentum cycling).
    Computed from the step count alone, so resuming needs no scheduler object.
    """
    total = max(int(total), 1)
    warmup = min(max(int(warmup), 0), total - 1) if total > 1 else 0
    if step < warmup:
        t = (step + 1) / warmup
        if schedule == "onecycle":
            lo = 1.0 / div_factor
            return lo + (1.0 - lo) * 0.5 * (1.0 - math.cos(math.pi * t))
        return t
    if schedule == "constant":
        return 1.0
    span = max(total - warmup - 1, 1)
    t = min((step - warmup) / span, 1.0)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))


# ------------------------------------------------------------------ the loop
@dataclass
class LoopState:
    """Counters of a resumable run (stored in the state file under ``loop``).

    Attributes:
        epoch: epochs completed.
        batch: batches done in the current (unfinished) epoch.
        step: batches done in total (optimiser steps plus skipped batches).
        elapsed: seconds of training so far, summed over resumed runs.
        skipped: batches skipped because the loss or a gradient was non-finite.
        history: one dict per evaluation (epoch 0 = before training, when done).
        best_epoch: epoch of the best evaluation so far (None before any).
        best_metric: its metric (lower is better).
        since_best: evaluations since the best one (early stopping).
        finished: the run ended (epochs done, early stop, budget or step limit).
        stop_reason: why it ended.
    """

    epoch: int = 0
    batch: int = 0
    step: int = 0
    elapsed: float = 0.0
    skipped: int = 0
    history: list = field(default_factory=list)
    best_epoch: int | None = None
    best_metric: float | None = None
    since_best: int = 0
    finished: bool = False
    stop_reason: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LoopState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class LoopSpec:
    """What :func:`run_epochs` needs to know about a run."""

    kind: str
    state_file: Path
    n_items: int
    batch_size: int
    epochs: int
    seed: int
    max_steps: int | None = None
    time_budget: float | None = None
    checkpoint_every: int | None = None
    patience: int | None = None
    header: dict = field(default_factory=dict)  # config, hashes: stored with every state


def epoch_batches(spec: LoopSpec, epoch: int) -> list[torch.Tensor]:
    """Global item indices of every batch of ``epoch``: a function of (seed, epoch) only.

    The same for any number of ranks, so a torchrun run sees the same global
    batches as a single process (see :func:`local_share` for a batch smaller
    than the number of ranks).
    """
    order = torch.randperm(spec.n_items, generator=seed_generator(spec.seed, epoch, 7919))
    return list(torch.split(order, spec.batch_size))


def local_share(index: torch.Tensor, ctx: DistContext) -> tuple[torch.Tensor, float]:
    """This rank's share of a global batch and the weight of its loss.

    A rank whose share would be empty (a last batch with fewer items than
    ranks) takes the batch's first item with weight 0: it runs the same code
    (so the rollout's frame-count all-reduce and the gradient all-reduce see
    every rank) and adds exactly nothing to the gradient.
    """
    local = shard(index, ctx.rank, ctx.world_size)
    if len(local) == 0:
        return index[:1], 0.0
    return local, 1.0


@contextmanager
def sigint_flag() -> Iterator[dict]:
    """Turn the first Ctrl-C into a flag checked between batches; a second one aborts."""
    flag = {"set": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if flag["set"]:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        flag["set"] = True
        log.warning("interrupt: finishing the current batch, then saving the state (Ctrl-C again aborts)")

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def write_state(spec: LoopSpec, loop: LoopState, payload: dict, ctx: DistContext) -> None:
    """Rank 0 writes the state file (header, loop counters, RNG states, payload)."""
    if ctx.is_main:
        save_state(
            spec.state_file,
            {"kind": spec.kind, **spec.header, "loop": loop.to_dict(), "rng": get_rng_state(), **payload},
        )


def restore_rng(state: dict) -> None:
    """Put the global RNGs back where the state file left them."""
    if "rng" in state:
        set_rng_state(state["rng"])


def _maybe_kill_self(step: int) -> None:
    target = os.environ.get(KILL_ENV)
    if target and step >= int(target):
        os.kill(os.getpid(), signal.SIGKILL)


def run_epochs(
    spec: LoopSpec,
    loop: LoopState,
    ctx: DistContext,
    *,
    train_batch: Callable[[int, int, torch.Tensor], dict | None],
    evaluate: Callable[[int], tuple[float, dict]],
    on_best: Callable[[], None],
    payload: Callable[[], dict],
    progress: bool = True,
    evaluate_first: bool = False,
) -> LoopState:
    """Run (or continue) the epochs of a training.

    Args:
        spec: sizes, limits and the state file.
        loop: counters, fresh or loaded from a state file.
        ctx: the distributed context.
        train_batch: ``(epoch, batch_index, global_indices) -> metrics or None``;
            does one optimiser step on this rank's share (None = skipped batch).
        evaluate: ``epoch -> (metric, entry)`` after an epoch (lower metric is
            better); ``entry`` goes into the history.
        on_best: called when an evaluation is the best so far (copy weights).
        payload: ``() -> dict`` of tensors/JSON-like values (model, optimiser,
            best weights) stored with every state.
        progress: show a progress bar (rank 0 only).
        evaluate_first: evaluate before the first epoch (epoch 0), as the
            baseline the run must beat.
    """
    from tqdm.auto import tqdm

    def record(epoch: int, metric: float, entry: dict) -> None:
        entry = {"epoch": epoch, **entry, "step": loop.step, "skipped": loop.skipped}
        loop.history.append(entry)
        if loop.best_metric is None or (math.isfinite(metric) and metric < loop.best_metric):
            loop.best_metric, loop.best_epoch, loop.since_best = float(metric), epoch, 0
            on_best()
        else:
            loop.since_best += 1
        if ctx.is_main:
            log.info(
                "%s epoch %s: %s",
                spec.kind,
                epoch,
                ", ".join(
                    f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in entry.items()
                    if k not in ("epoch",)
                ),
            )

    if loop.finished:
        return loop
    started = time.monotonic()
    base_elapsed = loop.elapsed

    def clock() -> float:
        return base_elapsed + time.monotonic() - started

    if evaluate_first and not loop.history:
        metric, entry = evaluate(0)
        record(0, metric, entry)
        loop.elapsed = clock()
        write_state(spec, loop, payload(), ctx)

    with sigint_flag() as interrupted:
        while loop.epoch < spec.epochs and not loop.finished:
            epoch = loop.epoch
            batches = epoch_batches(spec, epoch)
            bar = tqdm(
                total=len(batches),
                initial=loop.batch,
                desc=f"{spec.kind} epoch {epoch + 1}/{spec.epochs}",
                disable=not (progress and ctx.is_main),
                leave=False,
                dynamic_ncols=True,
            )
            stop = ""
            try:
                for b in range(loop.batch, len(batches)):
                    metrics = train_batch(epoch, b, batches[b])
                    loop.batch, loop.step = b + 1, loop.step + 1
                    if metrics is None:
                        loop.skipped += 1
                    elif bar is not None:
                        bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
                    bar.update(1)
                    loop.elapsed = clock()
                    if spec.max_steps is not None and loop.step >= spec.max_steps:
                        stop = f"reached the limit of {spec.max_steps} optimiser steps"
                    elif spec.time_budget is not None and ctx.any(loop.elapsed >= spec.time_budget):
                        stop = f"time budget of {spec.time_budget:g} s used"
                    if ctx.any(interrupted["set"]):
                        write_state(spec, loop, payload(), ctx)
                        raise TrainingInterrupted(
                            f"{spec.kind} interrupted at epoch {epoch + 1}, batch {b + 1}/{len(batches)}; "
                            f"state saved to {spec.state_file}. Run the same command again to continue."
                        )
                    if stop:
                        break
                    if spec.checkpoint_every and loop.step % spec.checkpoint_every == 0 and b + 1 < len(batches):
                        write_state(spec, loop, payload(), ctx)
                    _maybe_kill_self(loop.step)
            finally:
                bar.close()
            if loop.skipped and loop.skipped == loop.step:
                raise TrainingError(
                    f"{spec.kind}: every batch so far ({loop.skipped}) had a non-finite loss or gradient; "
                    "lower the learning rate or the step size (eta), or check the data for bad forces."
                )
            partial = loop.batch < len(batches)
            if not partial:
                loop.epoch, loop.batch = epoch + 1, 0
            metric, entry = evaluate(epoch + 1)
            if partial:
                entry["partial_epoch"] = round(loop.batch / len(batches), 4)
            record(epoch + 1, metric, entry)
            if spec.patience is not None and loop.since_best >= spec.patience:
                stop = f"early stopping: no improvement for {spec.patience} evaluations"
            if not stop and loop.epoch >= spec.epochs:
                stop = f"completed {spec.epochs} epochs"
            if stop:
                loop.finished, loop.stop_reason = True, stop
            loop.elapsed = clock()
            write_state(spec, loop, payload(), ctx)
            if not stop:
                _maybe_kill_self(loop.step)
    if not loop.finished:
        loop.finished, loop.stop_reason = True, f"completed {spec.epochs} epochs"
    if ctx.is_main:
        log.info(
            "%s finished: %s; best epoch %s (%.5g)",
            spec.kind,
            loop.stop_reason,
            loop.best_epoch,
            loop.best_metric if loop.best_metric is not None else float("nan"),
        )
    return loop


# ---------------------------------------------------------------------- data
def _trim(batch, n: int):
    """Drop padding columns beyond ``n`` atoms (padding always sits at the end)."""
    from ase_bptt.batch import Batch

    if batch.positions.shape[1] == n:
        return batch
    return Batch(
        positions=batch.positions[:, :n],
        numbers=batch.numbers[:, :n],
        masses=batch.masses[:, :n],
        mask=batch.mask[:, :n],
        fixed=batch.fixed[:, :n],
        cell=batch.cell,
        pbc=batch.pbc,
    )


@dataclass
class FrameSet:
    """Every frame of a split as one padded Batch, loaded once.

    Attributes:
        batch: all frames, padded to the largest atom count.
        forces: reference forces ``(F, N, 3)`` eV/A.
        energy: reference energies ``(F,)`` eV, or None when any frame lacks one.
        traj_ids: the trajectories the frames came from (sorted, unique).
    """

    batch: Any
    forces: torch.Tensor
    energy: torch.Tensor | None
    traj_ids: list[str]

    def __len__(self) -> int:
        return len(self.batch)

    def to(self, device=None, dtype=None) -> FrameSet:
        return FrameSet(
            self.batch.to(device, dtype),
            self.forces.to(device=device, dtype=dtype),
            None if self.energy is None else self.energy.to(device=device, dtype=dtype),
            self.traj_ids,
        )

    def take(self, index: torch.Tensor) -> tuple[Any, torch.Tensor, torch.Tensor | None]:
        """Frames ``index`` as (Batch, forces, energy), trimmed to their largest atom count."""
        index = index.to(self.forces.device)
        batch = self.batch.select(index)
        n = int(batch.mask.sum(1).max()) if len(index) else 0
        return (_trim(batch, n), self.forces[index, :n], None if self.energy is None else self.energy[index])


def load_frames(db, split: str, *, dtype: torch.dtype = torch.float64) -> FrameSet | None:
    """All frames of the trajectories in ``split`` (converged or not); None when there are none.

    Reads through :class:`~ase_bptt.data.datasets.FrameDataset` (raw arrays, no Atoms) once.
    """
    from ase_bptt.data.datasets import FrameDataset

    dataset = FrameDataset(db, split, converged_only=False, dtype=dtype)
    if len(dataset) == 0:
        return None
    whole = next(dataset.batches(len(dataset)))
    return FrameSet(whole.batch, whole.forces, whole.energy, sorted(set(dataset.traj_ids)))


@dataclass
class RelaxationSet:
    """(initial, relaxed) pairs of a split as padded tensors, loaded once."""

    initial: Any
    relaxed: torch.Tensor
    labels: list
    traj_ids: list[str]

    def __len__(self) -> int:
        return len(self.initial)

    def to(self, device=None, dtype=None) -> RelaxationSet:
        return RelaxationSet(
            self.initial.to(device, dtype), self.relaxed.to(device=device, dtype=dtype), self.labels, self.traj_ids
        )

    def take(self, index: torch.Tensor) -> tuple[Any, torch.Tensor]:
        index = index.to(self.relaxed.device)
        batch = self.initial.select(index)
        n = int(batch.mask.sum(1).max()) if len(index) else 0
        return _trim(batch, n), self.relaxed[index, :n]


def load_relaxations(
    db, split: str, *, converged_only: bool = True, dtype: torch.dtype = torch.float64
) -> RelaxationSet | None:
    """Initial structure and relaxed positions of every (converged) trajectory in ``split``.

    Reads through :class:`~ase_bptt.data.datasets.RelaxationDataset`, whose relaxed positions
    are unwrapped to the minimum image of the initial ones. None when the split is empty.
    """
    from ase_bptt.data.datasets import RelaxationDataset

    dataset = RelaxationDataset(db, split, converged_only=converged_only, dtype=dtype)
    if len(dataset) == 0:
        return None
    whole = next(dataset.batches(len(dataset)))
    return RelaxationSet(whole.initial, whole.relaxed, list(whole.labels), list(whole.traj_ids))


def check_same_run(sfile: Path, state: dict, header: dict, *, ignore=frozenset()) -> None:
    """Refuse to mix a state file with another config, database or init checkpoint.

    Raises:
        ConfigMismatchError: naming the state file and what differs.
    """
    problems = []
    if state.get("data_fingerprint") != header["data_fingerprint"]:
        problems.append("the train split of the database differs")
    if state.get("init") != header.get("init"):
        problems.append("the init checkpoint differs")
    if state.get("config_hash") != header["config_hash"]:
        diffs = config_differences(state.get("config", {}), header["config"], ignore=ignore)
        problems.append("the configuration differs (" + "; ".join(diffs[:6]) + ")")
    if problems:
        raise ConfigMismatchError(
            f"{sfile} belongs to another run: {', '.join(problems)}. Delete it (and the output) to start "
            "afresh, or choose another output path."
        )


def run_header(config_dict: dict, traj_ids: list[str], init_digest: str | None) -> dict:
    """What identifies a training run: its config, its train data and its initial model."""
    return {
        "config": config_dict,
        "config_hash": config_hash(config_dict, ignore=RUN_CONTROL),
        "data_fingerprint": fingerprint(traj_ids),
        "init": init_digest,
    }


def start_or_resume(
    out: Path, header: dict, *, kind: str, ctx: DistContext, overwrite: bool
) -> tuple[Path, dict | None, bool]:
    """Decide how a pretrain/finetune run to ``out`` starts.

    Returns:
        ``(state_file, state, done)``: ``state`` is the saved state to resume
        from (None: start afresh); ``done`` is True when ``out`` already holds
        the finished result of this very run (nothing to do).

    Raises:
        ConfigMismatchError: ``out`` or its state file belong to another
            configuration, database or initial model (never mixed in silently).
    """
    from ase_bptt.models.checkpoint import load_checkpoint
    from ase_bptt.train.state import load_state, state_path

    sfile = state_path(out)
    if overwrite:
        return sfile, None, False
    if sfile.exists():
        state = load_state(sfile, kind=kind)
        check_same_run(sfile, state, header, ignore=RUN_CONTROL)
        done = bool(state["loop"]["finished"]) and out.exists()
        if done and ctx.is_main:
            log.info("%s is already finished (%s); nothing to do", out, state["loop"]["stop_reason"])
        return sfile, state, done
    if out.exists():
        meta = load_checkpoint(out)["metadata"]
        if (
            meta.get("config_hash") == header["config_hash"]
            and meta.get("data_fingerprint") == header["data_fingerprint"]
            and meta.get("init_digest") == header["init"]
        ):
            return sfile, None, True
        raise ConfigMismatchError(
            f"{out} already exists and was not made by this configuration, database and initial model; "
            "choose another output path or pass overwrite=True (--overwrite)."
        )
    return sfile, None, False
