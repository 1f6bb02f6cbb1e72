"""The skeleton of a training run, shared by pretraining and BPTT fine-tuning.

:meth:`TrainingRun.run` does what every run does, once: join the process
group, open the database, identify the run (config, train data, initial
model), decide whether to start, resume or do nothing
(:func:`~ase_bptt.runs.resume.start_or_resume`), restore a saved state, run
the epochs (:func:`~ase_bptt.runs.loop.run_epochs`), keep the best weights
by the validation metric and export them as a checkpoint (rank 0). A
subclass fills in the hooks: :meth:`~TrainingRun.load_data`,
:meth:`~TrainingRun.build`, :meth:`~TrainingRun.train_batch`,
:meth:`~TrainingRun.validate` and :meth:`~TrainingRun.export_settings`
(plus the optional ones).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ase_bptt.data.datasets import open_db
from ase_bptt.outputs import check_not_inputs
from ase_bptt.runs.config import TrainConfig, file_digest, resolve_dtype, run_header
from ase_bptt.runs.distributed import DistContext, init_distributed
from ase_bptt.runs.loop import LoopSpec, LoopState, restore_rng, run_epochs
from ase_bptt.runs.resume import start_or_resume
from ase_bptt.runs.state import state_path

if TYPE_CHECKING:
    from ase_bptt.models.base import ForceModel

__all__ = ["TrainingRun"]

log = logging.getLogger("ase_bptt.train")


class TrainingRun:
    """One resumable training run from a database to a checkpoint.

    Args:
        db: a TrajectoryDB or its path.
        out: the checkpoint to write; the state file goes next to it.
        config: the run's settings.
        init: the checkpoint to start from (None: the subclass decides).
        progress: show progress bars (rank 0 only).
        overwrite: replace an ``out`` made with other settings or data.

    Attributes (set by the hooks):
        train, val: the train and val splits (``val`` may be None).
        model, optimizer: what :meth:`build` made.
        best: the best weights so far (``"model"``, plus :meth:`best_extras`).
        loop: the loop counters.
    """

    kind: ClassVar[str]
    #: What progress bars call the run (the stage a user sees).
    stage: ClassVar[str] = ""
    #: Evaluate before the first epoch (the baseline the run must beat).
    evaluate_first: ClassVar[bool] = False
    #: What is kept of the best evaluation: the weights and :meth:`best_extras`.
    best_keys: ClassVar[tuple[str, ...]] = ("model",)

    train: Any
    val: Any
    model: ForceModel
    optimizer: torch.optim.Optimizer

    def __init__(self, db, out, config: TrainConfig, init=None, *, progress: bool, overwrite: bool) -> None:
        self.db_arg, self.out, self.config = db, Path(out), config
        self.init = init
        self.progress, self.overwrite = progress, overwrite
        self.best: dict[str, Any] = dict.fromkeys(self.best_keys)
        self.loop = LoopState()

    # -------------------------------------------------------------- hooks
    def load_data(self) -> None:
        """Set ``self.train`` and ``self.val`` (raise EmptySplitError when train is empty)."""
        raise NotImplementedError

    def prepare_init(self) -> Any:
        """The initial model: a checkpoint path, a universal MLIP's name or None (a subclass may make one first)."""
        return self.init

    def build(self, state: dict | None) -> None:
        """Set ``self.model`` and ``self.optimizer`` (the state, if any, is loaded afterwards)."""
        raise NotImplementedError

    def limits(self) -> tuple[int | None, int | None]:
        """``(max optimiser steps, patience)`` of the loop (None: no limit)."""
        return None, None

    def log_start(self) -> None:
        """Say what a fresh run trains on (rank 0)."""

    def train_batch(self, epoch: int, b: int, index: torch.Tensor) -> dict | None:
        """One optimiser step on this rank's share of global batch ``index`` (None: skipped)."""
        raise NotImplementedError

    def validate(self, epoch: int) -> tuple[float, dict]:
        """``(metric, history entry)`` after an epoch; lower is better."""
        raise NotImplementedError

    def best_extras(self) -> dict:
        """What is kept with the best weights besides them (keys: ``best_keys``), e.g. the step rule."""
        return {}

    def state_extras(self) -> dict:
        """What a state file holds besides the model, optimiser and best weights."""
        return {}

    def export_settings(self) -> tuple[dict, dict]:
        """``(relax settings, metadata)`` of the exported checkpoint, beyond the common metadata."""
        raise NotImplementedError

    def before_export(self) -> None:
        """Work every rank does after training, before rank 0 exports (e.g. a sharded evaluation)."""

    def export_weights(self) -> dict | None:
        """The weights exported (called after :meth:`export_settings`); None: the model as it is."""
        return self.best["model"]

    # ------------------------------------------------------------ skeleton
    def run(self) -> Path:
        """Train (or resume, or find the run finished) and return ``out``."""
        from ase_bptt.models.universal import universal_init

        init_file = None if universal_init(self.init) else self.init
        check_not_inputs(
            [(self.out, "the checkpoint"), (state_path(self.out), "the training state")],
            [(self.db_arg, "the database"), (init_file, "the --init checkpoint")],
            option="-o/--out",
        )
        self.ctx: DistContext = init_distributed(self.config.device)
        out = self._run()
        # Wait for every rank only after a success: a rank that raised must exit (its peers' collectives then
        # fail and they exit too) rather than wait at a barrier the others never reach.
        self.ctx.close()
        return out

    def _run(self) -> Path:
        ctx, config = self.ctx, self.config
        self.dtype, self.device = resolve_dtype(config.dtype), ctx.device
        if getattr(self, "train", None) is None:  # not loaded yet (a preflight may have)
            self.db = open_db(self.db_arg)
            self.load_data()
        self.init = self.prepare_init()
        config = self.config  # as load_data decided it (its "auto" settings: ase_bptt.train.presets)
        self.header = run_header(config.to_dict(), self.train.trajectories, file_digest(self.init))
        sfile, state, done = start_or_resume(self.out, self.header, kind=self.kind, ctx=ctx, overwrite=self.overwrite)
        if done:
            return self.out
        self.build(state)
        max_steps, patience = self.limits()
        spec = LoopSpec(
            kind=self.kind,
            state_file=sfile,
            n_items=len(self.train),
            batch_size=config.batch_size,
            epochs=config.epochs,
            seed=config.seed,
            max_steps=max_steps,
            time_budget=config.time_budget,
            checkpoint_every=config.checkpoint_every,
            patience=patience,
            eval_every=getattr(config, "eval_every", None),  # pretraining: once per epoch
            stage=self.stage,
            header=self.header,
        )
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.best = {key: state.get(f"best_{key}") for key in self.best}
            self.loop = LoopState.from_dict(state["loop"])
            restore_rng(state)
            if ctx.is_main:
                log.info(
                    "resuming %s from %s at epoch %d, batch %d", self.kind, sfile, self.loop.epoch + 1, self.loop.batch
                )
        elif ctx.is_main:
            self.log_start()
        if not self.loop.finished:
            run_epochs(spec, self.loop, ctx, self, progress=self.progress, evaluate_first=self.evaluate_first)
        self.before_export()
        if ctx.is_main:
            self._export()
        ctx.barrier()
        return self.out

    def keep_best(self) -> None:
        """Copy the weights (and :meth:`best_extras`) of the best evaluation so far."""
        self.best = {"model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}}
        self.best.update(self.best_extras())

    def state_payload(self) -> dict:
        """Model, optimiser, best weights and :meth:`state_extras`, stored with every state."""
        best = {f"best_{key}": value for key, value in self.best.items()}
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            **best,
            **self.state_extras(),
        }

    def _export(self) -> None:
        from ase_bptt.models.checkpoint import save_checkpoint

        relax, extra = self.export_settings()
        final = copy.deepcopy(self.model)
        weights = self.export_weights()
        if weights is not None:
            final.load_state_dict(weights)
        loop, header = self.loop, self.header
        metadata = {
            "kind": self.kind,
            "database": str(self.db.name),
            "data_fingerprint": header["data_fingerprint"],
            "config": header["config"],
            "config_hash": header["config_hash"],
            "init": None if self.init is None else str(self.init),
            "init_digest": header["init"],
            **extra,
            "history": loop.history,
            "best_epoch": loop.best_epoch,
            "best_metric": loop.best_metric,
            "stop_reason": loop.stop_reason,
            "skipped_batches": loop.skipped,
            "steps": loop.step,
            "world_size": self.ctx.world_size,
        }
        save_checkpoint(self.out, final.eval(), relax=relax, metadata=metadata)
        log.info("wrote %s (best epoch %s, %s)", self.out, loop.best_epoch, loop.stop_reason)
