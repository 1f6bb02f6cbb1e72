"""``ase-bptt info``: what a database or checkpoint holds, from its first bytes and contents."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from ase_bptt.errors import AseBpttError
from ase_bptt.evaluation.rows import fmt as _fmt
from ase_bptt.evaluation.rows import history_series

__all__ = ["UnrecognisedFileError", "describe"]


class UnrecognisedFileError(AseBpttError, ValueError):
    """A path is neither an ase-bptt database nor an ase-bptt checkpoint."""


_SQLITE_MAGIC = b"SQLite format 3\x00"
_ZIP_MAGIC = b"PK\x03\x04"


def _kind_of(path: str) -> str:
    """ "database" or "checkpoint", from the file's first bytes (the suffix only as a hint)."""
    if "://" in path:
        return "database"
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if p.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a database (.db) or a checkpoint (.pt)")
    with open(p, "rb") as f:
        head = f.read(16)
    if head.startswith(_SQLITE_MAGIC):
        return "database"
    if head.startswith(_ZIP_MAGIC) or p.suffix in (".pt", ".pth", ".ckpt"):
        return "checkpoint"
    if p.suffix == ".json" or p.suffix == ".db":
        return "database"
    raise UnrecognisedFileError(
        f"{path} is neither an ase-bptt database (SQLite .db) nor a checkpoint (.pt); "
        "make one with `ase-bptt import` or `ase-bptt pretrain`"
    )


def _describe_checkpoint(path: str) -> str:
    from ase.data import chemical_symbols

    from ase_bptt.models.checkpoint import load_checkpoint, load_model
    from ase_bptt.models.domain import DOMAIN_KEY, read_training_domain

    ck = load_checkpoint(path)
    # Rebuild the model it describes: weights that do not fit the config, or hold NaN, are an error here too.
    load_model(ck, name=path)
    domain = read_training_domain(ck, path)
    model = ck["model"]
    n_params = sum(int(v.numel()) for v in model["state_dict"].values() if hasattr(v, "numel"))
    config = dict(model.get("config") or {})
    species = config.pop("species", None)
    lines = [
        f"{path}: ase-bptt checkpoint (format {ck['format_version']}, written by ase-bptt {ck['package_version']})",
        f"  model     {model['name']}, {n_params} numbers in its weights and buffers",
        "  config    "
        + ", ".join(f"{k}={v}" for k, v in config.items() if not isinstance(v, (dict, list)) or len(str(v)) < 40),
    ]
    if species:
        lines.append("  species   " + " ".join(chemical_symbols[int(z)] for z in species))
    relax = ck.get("relax")
    if relax:
        step = relax.get("step")
        step_text = ", ".join(
            f"{k}={v}"
            for k, v in (step.items() if isinstance(step, Mapping) else relax.items())
            if k not in ("state_dict", "tol", "max_steps") and not hasattr(v, "numel")
        )
        lines.append(f"  relax     {step_text}; tol={relax.get('tol')} A, max_steps={relax.get('max_steps')}")
    else:
        lines.append("  relax     none stored (a pretrained model: relax with ASE's optimizers, or fine-tune it)")
    meta = dict(ck.get("metadata") or {})
    history = meta.pop("history", None)
    meta.pop(DOMAIN_KEY, None)
    if domain is not None:
        low, high = domain["n_atoms"]
        periodic = " or ".join("".join(a for a, p in zip("xyz", row) if p) or "none" for row in domain["pbc"])
        nearest = domain.get("min_distance")
        lines.append(
            f"  trained   on {' '.join(chemical_symbols[z] for z in domain['species'])}, {low}-{high} atoms, "
            f"periodic along {periodic}" + ("" if nearest is None else f", atoms at least {nearest:.3f} A apart")
        )
    for key, value in meta.items():
        text = json.dumps(value, default=str)
        lines.append(f"  {key:<9s} {text if len(text) < 100 else text[:97] + '...'}")
    for phase, series in history_series(history).items():
        last = {m: pts[-1][1] for m, pts in series.items()}
        n = max(len(pts) for pts in series.values())
        lines.append(
            f"  history   {phase}: {n} entries; last " + ", ".join(f"{m}={_fmt(v)}" for m, v in sorted(last.items()))
        )
    return "\n".join(lines)


def describe(path: str | os.PathLike) -> str:
    """Human-readable description of a database or checkpoint (``ase-bptt info``).

    Raises:
        FileNotFoundError: no such path.
        UnrecognisedFileError: neither kind of file.
        CheckpointError / NotATrajectoryDBError: the file is damaged or foreign.
    """
    path = os.fspath(path)
    if _kind_of(path) == "checkpoint":
        return _describe_checkpoint(path)
    from ase_bptt.data.db import TrajectoryDB

    return TrajectoryDB(path, create=False).summary()
