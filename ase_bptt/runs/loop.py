"""The resumable epoch loop, the learning-rate schedule and SIGINT handling.

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
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ase_bptt.runs.config import seed_generator
from ase_bptt.runs.distributed import DistContext, shard
from ase_bptt.runs.errors import TrainingError, TrainingInterrupted
from ase_bptt.runs.state import get_rng_state, save_state, set_rng_state

__all__ = [
    "KILL_ENV",
    "EpochHooks",
    "LoopSpec",
    "LoopState",
    "epoch_batches",
    "local_share",
    "lr_factor",
    "restore_rng",
    "run_epochs",
    "sigint_flag",
]

log = logging.getLogger("ase_bptt.train")

#: Hidden test hook: a run SIGKILLs itself right after this many optimiser steps.
KILL_ENV = "ASE_BPTT_TEST_KILL_AFTER_STEP"


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
        best_epoch: epoch of the best evaluation so far (None before any; fractional
            for an evaluation inside an epoch, see ``LoopSpec.eval_every``).
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
    best_epoch: float | None = None
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
    """What :func:`run_epochs` needs to know about a run.

    ``eval_every``: evaluate after every this many batches (counted over the
    whole run, so resuming keeps the cadence) instead of after every epoch; the
    run's last batch is always followed by an evaluation. None: once per epoch.
    """

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
    eval_every: int | None = None
    stage: str = ""  # what the progress bar calls the run ("pretraining", "BPTT"); default: kind
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


class EpochHooks(Protocol):
    """What :func:`run_epochs` calls (a :class:`~ase_bptt.runs.run.TrainingRun` is one)."""

    def train_batch(self, epoch: int, b: int, index: torch.Tensor) -> dict | None:
        """One optimiser step on this rank's share of global batch ``index``; None: skipped."""

    def validate(self, epoch: int) -> tuple[float, dict]:
        """``(metric, history entry)`` after an epoch; lower metric is better."""

    def keep_best(self) -> None:
        """The last evaluation is the best so far: copy the weights."""

    def state_payload(self) -> dict:
        """Tensors and JSON-like values (model, optimiser, best weights) stored with every state."""


def run_epochs(
    spec: LoopSpec,
    loop: LoopState,
    ctx: DistContext,
    hooks: EpochHooks,
    *,
    progress: bool = True,
    evaluate_first: bool = False,
) -> LoopState:
    """Run (or continue) the epochs of a training.

    Args:
        spec: sizes, limits and the state file.
        loop: counters, fresh or loaded from a state file.
        ctx: the distributed context.
        hooks: the run's training step, evaluation, best-model copy and state payload.
        progress: show a progress bar (rank 0 only).
        evaluate_first: evaluate before the first epoch (epoch 0), as the
            baseline the run must beat.
    """
    if loop.finished:
        return loop
    run = _EpochRunner(spec, loop, ctx, hooks, progress)
    if evaluate_first and not loop.history:
        metric, entry = hooks.validate(0)
        run.record(0, metric, entry)
        loop.elapsed = run.clock()
        write_state(spec, loop, hooks.state_payload(), ctx)
    with sigint_flag() as interrupted:
        while loop.epoch < spec.epochs and not loop.finished:
            run.epoch(interrupted)
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


class _EpochRunner:
    """One call of :func:`run_epochs`: its clock, its records and one epoch at a time."""

    def __init__(self, spec: LoopSpec, loop: LoopState, ctx: DistContext, hooks: EpochHooks, progress: bool) -> None:
        self.spec, self.loop, self.ctx, self.hooks, self.progress = spec, loop, ctx, hooks, progress
        self.started, self.base_elapsed = time.monotonic(), loop.elapsed

    def clock(self) -> float:
        return self.base_elapsed + time.monotonic() - self.started

    def record(self, epoch: float, metric: float, entry: dict) -> None:
        loop = self.loop
        entry = {"epoch": epoch, **entry, "step": loop.step, "skipped": loop.skipped}
        loop.history.append(entry)
        if loop.best_metric is None or (math.isfinite(metric) and metric < loop.best_metric):
            loop.best_metric, loop.best_epoch, loop.since_best = float(metric), epoch, 0
            self.hooks.keep_best()
        else:
            loop.since_best += 1
        if self.ctx.is_main:
            shown = ", ".join(
                f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items() if k != "epoch"
            )
            log.info("%s epoch %s: %s", self.spec.kind, epoch, shown)

    def evaluated_now(self) -> bool:
        return bool(self.loop.history) and self.loop.history[-1].get("step") == self.loop.step

    def patience_spent(self) -> str:
        if self.spec.patience is not None and self.loop.since_best >= self.spec.patience:
            return f"early stopping: no improvement for {self.spec.patience} evaluations"
        return ""

    def save(self) -> None:
        write_state(self.spec, self.loop, self.hooks.state_payload(), self.ctx)

    def epoch(self, interrupted: dict) -> None:
        """Train the rest of the current epoch, evaluate when due, and record why the run stops, if it does."""
        from tqdm.auto import tqdm

        spec, loop = self.spec, self.loop
        epoch = loop.epoch
        batches = epoch_batches(spec, epoch)
        # With a step budget the bar counts the run's optimiser steps (what remains of the budget);
        # without one, the epoch's batches.
        budget = spec.max_steps
        bar = tqdm(
            total=budget if budget is not None else len(batches),
            initial=loop.step if budget is not None else loop.batch,
            desc=spec.stage or spec.kind,
            disable=not (self.progress and self.ctx.is_main),
            leave=False,
            dynamic_ncols=True,
        )
        bar.set_description_str(f"{spec.stage or spec.kind}, epoch {epoch + 1}", refresh=False)
        try:
            stop = self.train_batches(epoch, batches, bar, interrupted)
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
        last = bool(stop) or loop.epoch >= spec.epochs
        due = spec.eval_every is None or loop.step % spec.eval_every == 0 or last
        if due and not self.evaluated_now():
            metric, entry = self.hooks.validate(epoch + 1)
            if partial:
                entry["partial_epoch"] = round(loop.batch / len(batches), 4)
            self.record(epoch + 1, metric, entry)
            stop = self.patience_spent() or stop
        if not stop and loop.epoch >= spec.epochs:
            stop = f"completed {spec.epochs} epochs"
        if stop:
            loop.finished, loop.stop_reason = True, stop
        loop.elapsed = self.clock()
        self.save()
        if not stop:
            _maybe_kill_self(loop.step)

    def train_batches(self, epoch: int, batches: list, bar: Any, interrupted: dict) -> str:
        """Optimiser steps over the epoch's remaining batches, with the evaluations and states due inside it;
        returns why the run stops ("" when the epoch ended normally)."""
        spec, loop, ctx = self.spec, self.loop, self.ctx
        for b in range(loop.batch, len(batches)):
            metrics = self.hooks.train_batch(epoch, b, batches[b])
            loop.batch, loop.step = b + 1, loop.step + 1
            if metrics is None:
                loop.skipped += 1
            else:
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
            bar.update(1)
            loop.elapsed = self.clock()
            stop = ""
            if spec.max_steps is not None and loop.step >= spec.max_steps:
                stop = f"reached the limit of {spec.max_steps} optimiser steps"
            elif spec.time_budget is not None and ctx.any(loop.elapsed >= spec.time_budget):
                stop = f"time budget of {spec.time_budget:g} s used"
            if ctx.any(interrupted["set"]):
                self.save()
                raise TrainingInterrupted(
                    f"{spec.kind} interrupted at epoch {epoch + 1}, batch {b + 1}/{len(batches)}; "
                    f"state saved to {spec.state_file}. Run the same command again to continue."
                )
            if stop:
                return stop
            if spec.eval_every and loop.step % spec.eval_every == 0 and b + 1 < len(batches):
                # An evaluation inside the epoch: its "epoch" is fractional (1.25: a
                # quarter into the second epoch); the state is written right after it.
                metric, entry = self.hooks.validate(epoch + 1)
                self.record(round(epoch + loop.batch / len(batches), 4), metric, entry)
                loop.elapsed = self.clock()
                stop = self.patience_spent()
                if stop:
                    return stop
                self.save()
            elif spec.checkpoint_every and loop.step % spec.checkpoint_every == 0 and b + 1 < len(batches):
                self.save()
            _maybe_kill_self(loop.step)
        return ""
