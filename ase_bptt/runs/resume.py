"""The resume decision: start afresh, continue from a state file, or nothing to do.

A state file or an output checkpoint is only ever continued by the run that
wrote it: same config (except the :data:`~ase_bptt.runs.config.RUN_CONTROL`
fields), same train trajectories, same initial checkpoint. Anything else is a
:class:`~ase_bptt.runs.errors.ConfigMismatchError`, never mixed in silently.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ase_bptt.runs.config import RUN_CONTROL, config_differences
from ase_bptt.runs.distributed import DistContext
from ase_bptt.runs.errors import ConfigMismatchError
from ase_bptt.runs.state import load_state, state_path

__all__ = ["check_same_run", "start_or_resume"]

log = logging.getLogger("ase_bptt.train")


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
