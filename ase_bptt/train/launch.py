"""Training runs in worker processes: both CPU cores on one run (torch.distributed), or several runs at once.

A worker is a fresh ``python -m ase_bptt.train.launch JOB.json`` process (not
multiprocessing: a user's script without a ``__main__`` guard would run again in
every spawned child) with one torch thread. :func:`run_workers` starts the jobs,
``parallel`` at a time, waits, and turns a worker's failure into one error in
the caller:

- **one run on several cores** (:func:`run_distributed`): the ranks of one
  pretraining or BPTT run under torch.distributed (gloo on the loopback), each
  taking its share of every batch, exactly as under ``torchrun``. The default
  model gains nothing from a second torch thread (184 CPU-s on one thread
  against 599 on two for the same pretraining), but two processes halve the work
  of each: the run takes about half the wall time, with the same model up to
  float rounding.
- **several runs at once** (the candidates raced on val, ase_bptt.train.candidates).

Rank 0 of a run prints its log lines and progress bar on the caller's stderr;
every other worker writes them to ``<out>.<rank>.log`` beside the run's output,
kept only when something failed (with the job and error files).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Job", "run_workers", "run_distributed", "db_argument", "default_workers"]

log = logging.getLogger("ase_bptt.train")


def default_workers(device: str | None) -> int:
    """Processes for one run: both cores of a CPU machine (at most 2), one on a GPU."""
    from ase_bptt.runs.distributed import resolve_device

    if resolve_device(device).type != "cpu":
        return 1
    return max(1, min(2, os.cpu_count() or 1))


def db_argument(db: Any) -> str:
    """What a worker opens: a TrajectoryDB's path or URL, or the path given."""
    return db.name if hasattr(db, "converged_fmax") else os.fspath(db)


@dataclass
class Job:
    """One worker: a ``kind`` ("pretrain" or "finetune") run to ``out``, as rank ``rank`` of ``world``.

    ``show``: its log lines and progress bar go to the caller's stderr (else to a log file).
    """

    kind: str
    db: str
    out: str
    config: dict[str, Any]
    init: str | None
    overwrite: bool
    rank: int = 0
    world: int = 1
    port: int = 0
    show: bool = False
    progress: bool = False
    log_level: int = logging.INFO
    name: str = ""
    files: dict[str, str] = field(default_factory=dict)

    def prepare(self) -> None:
        """Write the job and name its log and error files (beside the run's output)."""
        base = Path(self.out)
        tag = f".{self.rank}" if self.world > 1 else ""
        self.files = {
            "job": str(base.with_name(f"{base.name}{tag}.job.json")),
            "log": str(base.with_name(f"{base.name}{tag}.log")),
            "error": str(base.with_name(f"{base.name}{tag}.error.json")),
        }
        Path(self.files["error"]).unlink(missing_ok=True)
        Path(self.files["job"]).write_text(json.dumps(self.__dict__))

    def environment(self) -> dict[str, str]:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if self.world > 1:
            env.update(
                RANK=str(self.rank),
                LOCAL_RANK=str(self.rank),
                WORLD_SIZE=str(self.world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(self.port),
            )
        else:
            for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(key, None)
        return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_workers(jobs: Sequence[Job], *, parallel: int, watch: Callable[[], None] | None = None) -> None:
    """Run ``jobs`` as worker processes, ``parallel`` at a time (all at once for the ranks of one run).

    Raises the first failed worker's error in this process (its class when it is one of ase-bptt's
    user errors, else :class:`~ase_bptt.runs.errors.TrainingError` with the worker's last line), and
    :class:`~ase_bptt.runs.errors.TrainingInterrupted` after Ctrl-C, once every worker has saved its state.
    """
    from ase_bptt.runs.errors import TrainingInterrupted

    pending = list(jobs)
    running: list[tuple[Job, subprocess.Popen, Any]] = []  # job, process, its log file (None: shown)
    failed: list[tuple[Job, int]] = []
    try:
        while pending or running:
            while pending and len(running) < parallel:
                job = pending.pop(0)
                job.prepare()
                stream = None if job.show else open(job.files["log"], "w")  # noqa: SIM115
                cmd = [sys.executable, "-m", "ase_bptt.train.launch", job.files["job"]]
                running.append((job, subprocess.Popen(cmd, stderr=stream, env=job.environment()), stream))
            time.sleep(0.5)
            for item in list(running):
                job, proc, stream = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                if stream is not None:
                    stream.close()
                if proc.returncode:
                    failed.append((job, proc.returncode))
            if failed and any(j.world > 1 for j, _ in failed):  # a rank failed: the others would wait forever
                for _, proc, _ in running:
                    proc.terminate()
            if watch is not None:
                watch()
    except KeyboardInterrupt:
        for _, proc, _ in running:
            proc.wait()  # each worker saves its state on the same Ctrl-C
        raise TrainingInterrupted(
            "interrupted; every training process saved its state. Run the same command again to continue."
        ) from None
    if failed:
        _raise(failed)
    for job in jobs:  # nothing to read after a success: the run's own files hold what it did
        for path in job.files.values():
            Path(path).unlink(missing_ok=True)


def _raise(failed: list[tuple[Job, int]]) -> None:
    """One error for the failed workers: the first user error one of them recorded, with its class."""
    import ase_bptt.runs.errors as common

    for job, _ in failed:
        path = Path(job.files["error"])
        if path.exists():
            record = json.loads(path.read_text())
            name = f"{job.name}: " if job.name else ""
            cls = _error_class(record["type"]) or common.TrainingError
            raise cls(name + record["message"])
    job, code = failed[0]
    lines = Path(job.files["log"]).read_text().splitlines() if Path(job.files["log"]).exists() else []
    tail = next((line for line in reversed(lines) if line.strip()), f"exit status {code}")
    who = job.name or f"{job.kind} process {job.rank}"
    raise common.TrainingError(f"{who} failed ({tail}); its log is {job.files['log']}")


def _error_class(name: str) -> type[Exception] | None:
    """The user-error class a worker raised, by name (None: not one whose message alone rebuilds it)."""
    import importlib

    for module in (
        "ase_bptt.runs.errors",
        "ase_bptt.runs.config",
        "ase_bptt.runs.state",
        "ase_bptt.models.checkpoint",
        "ase_bptt.errors",
    ):
        cls = getattr(importlib.import_module(module), name, None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            return cls
    return None


def run_distributed(kind: str, db: Any, out: Path, config, init, *, workers: int, progress: bool, overwrite: bool):
    """One ``kind`` run to ``out`` on ``workers`` processes under torch.distributed (see the module doc)."""
    port = _free_port()
    level = logging.getLogger("ase_bptt").getEffectiveLevel()
    jobs = [
        Job(
            kind,
            db_argument(db),
            str(out),
            config.to_dict(),
            None if init is None else str(init),
            overwrite,
            rank=rank,
            world=workers,
            port=port,
            show=rank == 0,
            progress=progress and rank == 0,
            log_level=level,
        )
        for rank in range(workers)
    ]
    log.info("%s on %d processes (one torch thread each)", kind, workers)
    run_workers(jobs, parallel=workers)
    return out


def _worker(spec: str) -> int:
    """``python -m ase_bptt.train.launch JOB.json``: one worker of :func:`run_workers`."""
    import torch

    from ase_bptt.errors import AseBpttError
    from ase_bptt.logs import log_to_stderr

    job = Job(**{k: v for k, v in json.loads(Path(spec).read_text()).items()})
    torch.set_num_threads(1)
    log_to_stderr(quiet=job.log_level > logging.INFO)
    try:
        if job.kind == "pretrain":
            from ase_bptt.train.pretrain import PretrainConfig, PretrainRun

            PretrainRun(
                job.db,
                job.out,
                PretrainConfig.from_dict(job.config),
                job.init,
                progress=job.progress,
                overwrite=job.overwrite,
            ).run()
        else:
            from ase_bptt.train.finetune import FinetuneRun
            from ase_bptt.train.finetune_config import FinetuneConfig

            FinetuneRun(
                job.db,
                job.out,
                FinetuneConfig.from_dict(job.config),
                job.init,
                progress=job.progress,
                overwrite=job.overwrite,
            ).run()
    except AseBpttError as exc:
        Path(job.files["error"]).write_text(json.dumps({"type": type(exc).__name__, "message": str(exc)}))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
