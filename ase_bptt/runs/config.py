"""Training configs and the identity of a run: the config base, JSON, hashes, seeds.

:class:`TrainConfig` is the base of :class:`~ase_bptt.train.pretrain.PretrainConfig`
and :class:`~ase_bptt.train.finetune.FinetuneConfig`: the JSON round trip
(``to_dict``/``from_dict``) and the checks they share are written here once.
:func:`to_jsonable` is the one JSON converter of the training package.

A run is identified by its header (:func:`run_header`): the config hash
(without the run-control fields of :data:`RUN_CONTROL`), a fingerprint of its
train trajectories and the digest of its initial checkpoint. A resumed run
must match all three.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from ase_bptt.device import DTYPES
from ase_bptt.errors import AseBpttError

__all__ = [
    "AUTO",
    "ConfigError",
    "option",
    "TrainConfig",
    "to_jsonable",
    "config_hash",
    "config_differences",
    "fingerprint",
    "file_digest",
    "resolve_dtype",
    "seed_generator",
    "RUN_CONTROL",
    "run_header",
]

#: Config fields that may change between a run and its resumption (they steer
#: the run, not its result).
RUN_CONTROL = frozenset({"device", "time_budget", "checkpoint_every", "eval_batch_size"})

#: A setting decided from the data when the run starts (ase_bptt.train.presets); a run's
#: identity (its hash, its checkpoint) holds the decided value, never "auto".
AUTO = "auto"

#: Fields added after state files were in use, left out of the hash at these default values,
#: so a run interrupted before the upgrade still resumes (its config had no such key).
ADDED_LATER: dict[str, object] = {
    "label_weights": {},
    "energy_weight": 0.0,
    "freeze": [],
    "recipe": "default",
    "candidates": {},
    "export": "own",
    "refit_energy": False,
}
# (FinetuneConfig's max_steps, lr_schedule and warmup defaults changed with the default recipe: a state file
# written before it resumes only under the settings it was made with, given explicitly.)

_Config = TypeVar("_Config", bound="TrainConfig")


class ConfigError(AseBpttError, ValueError):
    """A training option is out of range; the message names the option and its value.

    ``field``: the config field at fault (None when it is not one field), so the
    command line can name its option instead.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flag: str | None = None,
    shown: str | None = None,
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None,
    metavar: str | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A config field that is also a command-line option, described once.

    Args:
        default, default_factory: as for :func:`dataclasses.field`.
        help: what the option does (the ``--help`` text, without the default).
        flag: the option's name (default ``--field-name``).
        shown: how ``--help`` shows the default when it is not the value itself
            (e.g. ``"auto: 30 when every train frame has an energy, else 0"``).
        choices: the allowed strings of a text field (or a function giving them: a registry).
        metavar: the value's placeholder in ``--help``.

    The command line reads everything else (type, default) from the field, so
    its ``[default: ...]`` cannot drift from the code (``ase_bptt.cli.config_options.config_params``).
    """
    meta = {"help": help, "flag": flag, "shown": shown, "choices": choices, "metavar": metavar}
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"cli": meta})


def to_jsonable(value: Any, *, max_tensor: int | None = None) -> Any:
    """``value`` as JSON-like data, the one converter of configs, checkpoints' relax dicts and reports.

    Dataclasses and ``to_dict`` objects become dicts, tuples lists, torch dtypes
    ``"float32"``, devices and paths strings, tensors and arrays lists, numpy
    scalars Python numbers. A tensor with more than ``max_tensor`` elements
    becomes a short ``"<tensor (shape)>"`` placeholder (e.g. a decoder's weights
    in a report).
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name), max_tensor=max_tensor) for f in dataclasses.fields(value)}
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return to_jsonable(value.to_dict(), max_tensor=max_tensor)
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v, max_tensor=max_tensor) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, max_tensor=max_tensor) for v in value]
    if isinstance(value, torch.Tensor):
        if max_tensor is not None and value.numel() > max_tensor:
            return f"<tensor {tuple(value.shape)}>"
        return value.detach().cpu().tolist()
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (torch.device, Path)):
        return str(value)
    return value


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """ "float32"/"float64" (or a torch dtype) to a torch floating dtype; None is float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be 'float32' or 'float64', not {dtype!r}.")
    return DTYPES[dtype]


class TrainConfig:
    """Base of the training configs (dataclasses): JSON round trip and shared checks.

    A subclass lists its fields and puts its own checks in :meth:`validate`,
    using :meth:`_at_least_one`, :meth:`_positive` and :meth:`_one_of`.
    """

    # Fields every training config has (the run skeleton reads them).
    epochs: int
    batch_size: int
    time_budget: float | None
    seed: int
    device: str | None
    dtype: str
    checkpoint_every: int | None

    def __post_init__(self) -> None:
        self.validate()
        resolve_dtype(self.dtype)

    def validate(self) -> None:
        """Raise :class:`ConfigError` for a value out of range (subclasses extend)."""

    def to_dict(self) -> dict:
        """JSON-like dict (stored in checkpoints and state files)."""
        return to_jsonable(self)

    @classmethod
    def from_dict(cls: type[_Config], d: dict) -> _Config:
        """Inverse of :meth:`to_dict` (unknown keys are an error)."""
        return cls(**d)

    def decided(self, name: str) -> Any:
        """The value of a setting that may be :data:`AUTO`, once the run has decided it (presets.py)."""
        value = getattr(self, name)
        if isinstance(value, str) and value == AUTO:
            raise RuntimeError(f"{type(self).__name__}.{name} is still {AUTO!r}: the run decides it from its data")
        return value

    def _fail(self, name: str, what: str) -> ConfigError:
        return ConfigError(f"{type(self).__name__}.{name} must be {what}, got {getattr(self, name)!r}.", field=name)

    def _at_least_one(self, names: Iterable[str]) -> None:
        for name in names:
            if int(getattr(self, name)) < 1:
                raise self._fail(name, "at least 1")

    def _positive(self, names: Iterable[str]) -> None:
        for name in names:
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise self._fail(name, "positive and finite")

    def _auto_or(self, names: Iterable[str], check, *, off: bool = False) -> None:
        """``check`` the fields ``names`` unless they are :data:`AUTO` (or None with ``off``)."""
        for name in names:
            value = getattr(self, name)
            if isinstance(value, str) and value != AUTO:
                raise self._fail(name, f"a number or {AUTO!r}")
            if value != AUTO and not (off and value is None):
                check((name,))

    def _one_of(self, name: str, choices: tuple[str, ...]) -> None:
        if getattr(self, name) not in choices:
            raise self._fail(name, "one of " + ", ".join(repr(c) for c in choices))


def config_hash(config_dict: dict, *, ignore: frozenset[str] | set[str] = frozenset()) -> str:
    """sha256 of the config without run-control fields (device, time budget, ...) and without the
    :data:`ADDED_LATER` fields at their defaults."""
    kept = {k: v for k, v in config_dict.items() if k not in ignore and not (k in ADDED_LATER and v == ADDED_LATER[k])}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(traj_ids: list[str]) -> str:
    """Training-data fingerprint: sha256 of the sorted trajectory ids."""
    return hashlib.sha256("\n".join(sorted(traj_ids)).encode()).hexdigest()[:16]


def file_digest(path: str | Path | None) -> str | None:
    """sha256 (first 16 hex digits) of a file, identifying an ``init`` checkpoint; for an ``init`` that names a
    universal MLIP (``"chgnet"``), :meth:`~ase_bptt.models.universal.UniversalInit.digest`."""
    if path is None:
        return None
    from ase_bptt.models.universal import universal_init

    if (spec := universal_init(path)) is not None:
        return spec.digest()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


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


def run_header(config_dict: dict, traj_ids: list[str], init_digest: str | None) -> dict:
    """What identifies a training run: its config, its train data and its initial model."""
    return {
        "config": config_dict,
        "config_hash": config_hash(config_dict, ignore=RUN_CONTROL),
        "data_fingerprint": fingerprint(traj_ids),
        "init": init_digest,
    }


def seed_generator(*parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch Generator seeded from a tuple of ints (e.g. seed, epoch, batch)."""
    h = hashlib.sha256(json.dumps([int(p) for p in parts]).encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(h[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return g
