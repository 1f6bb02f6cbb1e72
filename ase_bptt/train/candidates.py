"""Settings chosen on the val split by a race of candidates (``FinetuneConfig.candidates``, ``--candidate``).

:func:`race` trains each candidate from the same pretrained model to its whole
budget, keeps the one whose exported model has the lowest val loss, and writes
its checkpoint to ``out`` with the race in its metadata (``candidates``: each
one's config and val loss; ``chosen``). Each candidate is an ordinary resumable
run in ``<out stem>.candidates/``, so an interrupted race resumes and a finished
one returns at once. The candidates run side by side in worker processes, one
per core (ase_bptt.train.launch), so on 2 cores two candidates cost the wall
time of one. A short probe of each, the better one continued, was tried and
dropped: at 30 of 150 steps on random-site silicon the worse learning rate led.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ase_bptt.runs.errors import ConfigMismatchError
from ase_bptt.train.finetune_config import FinetuneConfig
from ase_bptt.train.launch import Job, db_argument, run_workers

__all__ = ["race", "candidate_dir"]

log = logging.getLogger("ase_bptt.train")


def candidate_dir(out: Path) -> Path:
    """Where the candidates of a race for ``out`` live: ``<out stem>.candidates/`` beside it."""
    return out.with_name(f"{out.stem}.candidates")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", name).strip("-")


def _show(bar: Any, jobs: Sequence[Job]) -> None:
    """Steps done and budgets of the candidates, from their state files (written every few steps)."""
    from ase_bptt.runs.state import load_state, state_path

    done = total = 0
    for job in jobs:
        sfile = state_path(Path(job.out))
        if not sfile.exists():
            continue
        try:
            state = load_state(sfile, kind="finetune")
        except Exception:  # noqa: BLE001 - a state being replaced this instant: read it next time
            continue
        config = state.get("config") or {}
        done += int(state["loop"]["step"])
        total += int(config.get("max_batches") or 0)
    if total:
        bar.total = total
    bar.n = done
    bar.refresh()


def _exported_metric(metadata: dict[str, Any]) -> float:
    """The val loss of the model a finished candidate exported (the no-harm record; without a val
    split, the run's best train loss)."""
    record = metadata.get("no_harm") or {}
    key = "pretrained_val_dq" if record.get("exported") == "pretrained" else "tuned_val_dq"
    value = record.get(key, metadata.get("best_metric"))
    return float(value) if value is not None and math.isfinite(value) else math.inf


def race(
    db: Any,
    out: str | os.PathLike,
    runs: Sequence[tuple[str, FinetuneConfig]],
    init: Path,
    *,
    progress: bool,
    overwrite: bool,
    workers: int | None = None,
) -> Path:
    """Race the candidate configs ``runs`` (:func:`~ase_bptt.train.presets.candidate_configs`) from the
    pretrained checkpoint ``init`` and write the winner to ``out`` (see the module doc).

    Args:
        db: the database (its path travels to the worker processes).
        out: the tuned checkpoint to write.
        runs: ``[(name, config)]``, two or more.
        init: the pretrained checkpoint every candidate starts from.
        progress: show progress bars.
        overwrite: replace an ``out`` (and candidates) made with other settings or data.
        workers: parallel processes (None: one per candidate, at most one per CPU).
    """
    from ase_bptt.models.checkpoint import atomic_torch_save, load_checkpoint
    from ase_bptt.train.finetune import FinetuneRun

    out = Path(out)
    folder = candidate_dir(out)
    paths = {name: folder / f"{_slug(name)}.pt" for name, _ in runs}
    identity = {name: config.to_dict() for name, config in runs}
    if out.exists() and not overwrite:
        previous = (load_checkpoint(out).get("metadata") or {}).get("candidates") or {}
        if {k: v.get("config") for k, v in previous.items()} != identity:
            raise ConfigMismatchError(
                f"{out} already exists and was not made by this race of candidates; choose another output path "
                "or pass overwrite=True (--overwrite)."
            )
    folder.mkdir(parents=True, exist_ok=True)
    n_workers = max(1, min(len(runs), workers or os.cpu_count() or 1))
    log.info("choosing on val: %s (each to its budget; %d processes)", ", ".join(n for n, _ in runs), n_workers)
    if n_workers > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        from tqdm.auto import tqdm

        jobs = [
            Job("finetune", db_argument(db), str(paths[name]), config.to_dict(), str(init), overwrite, name=name)
            for name, config in runs
        ]
        bar = tqdm(desc="BPTT candidates (optimiser steps)", disable=not progress, leave=False, dynamic_ncols=True)
        try:
            run_workers(jobs, parallel=n_workers, watch=lambda: _show(bar, jobs))
        finally:
            bar.close()
    else:
        for name, config in runs:
            FinetuneRun(db, paths[name], config, init, progress=progress, overwrite=overwrite).run()
    scores = {name: _exported_metric(load_checkpoint(paths[name])["metadata"]) for name, _ in runs}
    chosen = min(scores, key=lambda k: (scores[k], list(scores).index(k)))
    loss = runs[0][1].loss
    log.info("chosen on val: %s (%s)", chosen, ", ".join(f"{k}: val {loss} {v:.4g}" for k, v in scores.items()))
    if out.exists() and out.stat().st_mtime >= paths[chosen].stat().st_mtime:
        if (load_checkpoint(out).get("metadata") or {}).get("chosen") == chosen:
            log.info("%s is already this race's result; nothing to do", out)
            return out
    checkpoint = load_checkpoint(paths[chosen])
    checkpoint["metadata"]["candidates"] = {name: {"config": identity[name], "val": scores[name]} for name, _ in runs}
    checkpoint["metadata"]["chosen"] = chosen
    atomic_torch_save(checkpoint, out)
    log.info("wrote %s (the %s candidate)", out, chosen)
    return out
