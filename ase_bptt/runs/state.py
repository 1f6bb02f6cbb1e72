"""Resumable training state: atomic writes, tensors and JSON-like values only.

A state file (``si.state.pt`` next to ``si.pt``) holds everything a killed run
needs to continue exactly where it stopped: model, optimiser and step-rule
state, the RNG states of torch, numpy and Python, the epoch and the number of
batches done in it, the best result so far and the history. It is written to a
temporary file in the same directory and renamed over the old one, so a kill
at any moment leaves either the previous or the new state, never half of one.
It is loaded with ``torch.load(..., weights_only=True)``; numpy's and Python's
RNG states are therefore stored as tensors and plain numbers.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from ase_bptt.errors import AseBpttError
from ase_bptt.models.checkpoint import atomic_torch_save, unsafe_pickle_reason

__all__ = [
    "STATE_FORMAT",
    "StateError",
    "state_path",
    "save_state",
    "load_state",
    "get_rng_state",
    "set_rng_state",
]

STATE_FORMAT = "ase-bptt-train-state"
STATE_VERSION = 1


class StateError(AseBpttError, ValueError):
    """A state file is unreadable, of another kind, or from another run."""


def state_path(out: str | os.PathLike) -> Path:
    """The state file that belongs to the output ``out`` (``si.pt`` -> ``si.state.pt``)."""
    out = Path(out)
    return out.with_name(out.stem + ".state.pt")


def save_state(path: str | os.PathLike, state: dict) -> Path:
    """Write a training state atomically (adds the format tag)."""
    return atomic_torch_save({"format": STATE_FORMAT, "format_version": STATE_VERSION, **state}, path)


def load_state(path: str | os.PathLike, *, kind: str | None = None) -> dict:
    """Load a state file written by :func:`save_state`.

    Args:
        path: the state file.
        kind: when given, the state must have been written by this kind of
            run ("pretrain" or "finetune").

    Raises:
        StateError: the file is truncated, not a state file, from a newer
            version, or of another kind. The message names the file.
    """
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:  # permissions, a disk error: the file may be fine, so never advise deleting it
        raise StateError(f"{path} cannot be read ({exc}); fix the file's access and run again to resume.") from exc
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:  # truncated, foreign, not a zip
        reason = (
            unsafe_pickle_reason(exc) if isinstance(exc, pickle.UnpicklingError) else f"{type(exc).__name__}: {exc}"
        )
        raise StateError(
            f"{path} is not a readable ase-bptt training state ({reason}). Delete it to start the run from scratch."
        ) from exc
    if not isinstance(obj, dict) or obj.get("format") != STATE_FORMAT:
        raise StateError(f"{path} is not an ase-bptt training state file; delete it or choose another output.")
    if int(obj.get("format_version", 0)) > STATE_VERSION:
        raise StateError(
            f"{path} was written by a newer ase-bptt (state format {obj['format_version']}); upgrade ase-bptt."
        )
    if kind is not None and obj.get("kind") != kind:
        raise StateError(f"{path} is the state of a {obj.get('kind')!r} run, not {kind!r}; choose another output path.")
    return obj


def get_rng_state() -> dict:
    """torch (CPU and CUDA), numpy (global) and Python RNG states as tensors and numbers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(version),
            "internal": torch.tensor(list(internal), dtype=torch.int64),
            "gauss_next": None if gauss_next is None else float(gauss_next),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`get_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
