"""Checkpoints: one safe, versioned file per tuned model (e.g. ``si.pt``).

A checkpoint is a single ``torch.save`` of a dict that holds only tensors and
JSON-like values (dict, list, tuple, str, int, float, bool, None), so it loads
with ``torch.load(..., weights_only=True)``: ase-bptt never unpickles Python
objects from a user's file. The layout (``FORMAT_VERSION`` 1) is described
once, in ``docs/checkpoint.md``.

Files are written atomically (a temporary file in the same directory, flushed
and fsync'ed, then ``os.replace``), so a crash never leaves half a checkpoint
under the real name. Every way a file can be wrong has its own exception,
all subclasses of :class:`CheckpointError`, each naming the file.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
from zlib import error as zlib_error

import numpy as np
import torch
from torch import nn

from ase_bptt.errors import AseBpttError, ModelDependencyError
from ase_bptt.models.adapt import ADAPT
from ase_bptt.models.mi_attention import MinImageADAPT
from ase_bptt.models.universal import UniversalModel

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MODEL_REGISTRY",
    "CheckpointError",
    "CheckpointNotFoundError",
    "NotACheckpointError",
    "CheckpointVersionError",
    "CorruptCheckpointError",
    "CheckpointKeyError",
    "UnknownModelError",
    "NonFiniteWeightsError",
    "InvalidStepRuleError",
    "unsafe_pickle_reason",
    "atomic_write",
    "atomic_torch_save",
    "register_model",
    "model_to_dict",
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
]

FORMAT = "ase-bptt"
FORMAT_VERSION = 1
_REQUIRED = ("format_version", "package_version", "model", "relax", "metadata")
_REQUIRED_MODEL = ("name", "config", "state_dict")


class CheckpointError(AseBpttError):
    """Base class: a checkpoint file cannot be used. The message names the file."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist."""


class NotACheckpointError(CheckpointError):
    """The file is readable but is not an ase-bptt checkpoint (e.g. a plain state dict)."""


class CheckpointVersionError(CheckpointError):
    """The checkpoint was written by a newer ase-bptt (higher ``format_version``)."""


class CorruptCheckpointError(CheckpointError):
    """Truncated, damaged, or holding pickled objects that are unsafe to load."""


class CheckpointKeyError(CheckpointError, KeyError):
    """Required entries are missing (or the weights do not match the model)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class NonFiniteWeightsError(CheckpointError):
    """The weights hold NaN or infinite numbers (a diverged training run): the model would predict NaN."""


class UnknownModelError(CheckpointError):
    """The checkpoint's model name is not in :data:`MODEL_REGISTRY`."""


class InvalidStepRuleError(CheckpointError):
    """The stored step rule cannot be used: a NaN or infinite number (a diverged ``--step learned`` run),
    an eta that is not positive, an unknown rule."""


# --------------------------------------------------------------------- registry
MODEL_REGISTRY: dict[str, type[nn.Module]] = {}


def register_model(cls: type[nn.Module]) -> type[nn.Module]:
    """Register a model class so :func:`load_model` can rebuild it (usable as a decorator).

    The class needs a ``model_name`` attribute (or its ``__name__`` is used),
    a ``config`` attribute with ``to_dict()``, and a classmethod
    ``from_config(config_dict)``.
    """
    if not callable(getattr(cls, "from_config", None)):
        raise TypeError(f"{cls.__name__} needs a classmethod from_config(config_dict) to be registered")
    MODEL_REGISTRY[getattr(cls, "model_name", cls.__name__)] = cls
    return cls


register_model(ADAPT)
register_model(MinImageADAPT)
register_model(UniversalModel)


# ------------------------------------------------------------------------ save
def _package_version() -> str:
    from ase_bptt import __version__

    return __version__


def _json_like(value: Any, where: str) -> Any:
    """Return ``value`` with numpy scalars/arrays and paths made safe; reject the rest."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is not a string; checkpoints hold JSON-like dicts only")
            out[k] = _json_like(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        items = [_json_like(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    raise TypeError(
        f"{where} is a {type(value).__name__}; checkpoints hold only tensors and JSON-like values "
        "(dict, list, str, int, float, bool, None) so they load safely. Convert it first."
    )


def model_to_dict(model: nn.Module) -> dict:
    """``{"name", "config", "state_dict"}`` of a registered model (tensors moved to CPU)."""
    name = getattr(model, "model_name", type(model).__name__)
    if name not in MODEL_REGISTRY:
        raise UnknownModelError(
            f"{type(model).__name__} is not a registered model; call "
            "ase_bptt.models.checkpoint.register_model on its class before saving it."
        )
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "to_dict", None)):
        raise TypeError(f"{type(model).__name__}.config must have to_dict() to be saved")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"name": name, "config": _json_like(config.to_dict(), "model.config"), "state_dict": state}


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file in the same directory, fsync it, rename it to ``path``.

    A crash (or an exception in ``write``) at any moment leaves either the old
    file or the complete new one, never a truncated file (used for
    checkpoints, training state files and ``ase-bptt relax`` outputs).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # mkstemp makes the file private (0600); give it the mode open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable; not possible everywhere (e.g. Windows)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`atomic_write`: never a truncated checkpoint under the real name."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    relax: dict | None = None,
    metadata: dict | None = None,
) -> Path:
    """Write ``model`` (and how to relax with it) to ``path`` atomically.

    Args:
        path: destination file (parent directories are created).
        model: a registered model, e.g. :class:`~ase_bptt.models.adapt.ADAPT`.
        relax: the relaxation settings the model was tuned with: the step
            rule's ``to_dict()`` under ``"step"``, plus ``tol`` and ``max_steps``.
        metadata: anything JSON-like (training data fingerprint, history, ...);
            ``created`` (now, UTC, ISO 8601) and ``package_version`` are set
            (overriding values of those names in ``metadata``).

    Returns:
        The path written.

    Raises:
        TypeError: a value that would not load under ``weights_only=True``.
        UnknownModelError: the model's class is not registered.
    """
    path = Path(path)
    # Ours win: "created" is when this file was written, even when a caller
    # copies the metadata of the checkpoint it started from.
    meta = {
        **(metadata or {}),
        "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "package_version": _package_version(),
    }
    checkpoint = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": _package_version(),
        "model": model_to_dict(model),
        "relax": _json_like(relax, "relax"),
        "metadata": _json_like(meta, "metadata"),
    }
    return atomic_torch_save(checkpoint, path)


# ------------------------------------------------------------------------ load
_ZIP_MAGIC = b"PK\x03\x04"


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read and validate a checkpoint (``torch.load(weights_only=True)``, on CPU).

    Raises:
        CheckpointNotFoundError: ``path`` does not exist.
        NotACheckpointError: a directory, a text file, a plain state dict, ...
        CorruptCheckpointError: truncated or damaged, or holds unsafe pickles.
        CheckpointVersionError: written by a newer ase-bptt.
        CheckpointKeyError: required entries are missing.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointNotFoundError(
            f"checkpoint {path} does not exist; check the path (pretrain writes e.g. runs/pretrain.pt)"
        )
    if path.is_dir():
        raise NotACheckpointError(f"{path} is a directory, not an ase-bptt checkpoint file")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CorruptCheckpointError(f"checkpoint {path} is empty (an interrupted copy?); restore or re-create it")
    if head != _ZIP_MAGIC:
        raise NotACheckpointError(
            f"{path} is not an ase-bptt checkpoint (not a torch zip archive); "
            "write checkpoints with ase_bptt.models.checkpoint.save_checkpoint"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            # torch does not check the CRCs it writes: damaged bytes inside a
            # tensor would load silently as wrong weights.
            bad = archive.testzip()
        if bad is not None:
            raise zipfile.BadZipFile(f"checksum mismatch in {bad}")
    except (zipfile.BadZipFile, OSError, EOFError, zlib_error) as e:
        raise CorruptCheckpointError(
            f"checkpoint {path} is truncated or corrupt ({e}); restore it from a backup or re-run "
            "the training that wrote it"
        ) from None
    if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        raise NotACheckpointError(f"{path} is a zip archive but not a torch checkpoint (no data.pkl inside)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CorruptCheckpointError(
            f"{path} holds pickled Python objects that are unsafe to load ({unsafe_pickle_reason(e)}); "
            "ase-bptt never unpickles such files. Re-save the model with "
            "ase_bptt.models.checkpoint.save_checkpoint."
        ) from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise CorruptCheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "restore it from a backup or re-run the training that wrote it"
        ) from None
    return validate_checkpoint(data, source=str(path))


def unsafe_pickle_reason(exc: BaseException) -> str:
    """What ``torch.load(weights_only=True)`` refused, without torch's advice to load the file unsafely.

    torch's message suggests ``weights_only=False`` ("will likely succeed"),
    which runs any code the file holds: never the advice for a file from
    elsewhere, so only the refused object's name is kept.
    """
    found = re.search(r"GLOBAL\s+([\w.]+)", str(exc))
    what = f"it asks for the Python object {found.group(1)}" if found else "it holds Python objects"
    return f"torch.load(weights_only=True) refused: {what}"


def _check_relax(relax: Any, source: str) -> None:
    """Rebuild the stored step rule, as :func:`load_model` rebuilds the weights: a bad rule fails on load.

    Raises:
        InvalidStepRuleError: naming the file and the bad value.
    """
    if not relax:
        return
    advice = "use the checkpoint of an earlier epoch, or re-run the fine-tuning (e.g. with a lower learning rate)"
    if not isinstance(relax, dict):
        raise InvalidStepRuleError(f"{source}: 'relax' is a {type(relax).__name__}, not a dict; re-save the checkpoint")
    for where, value in _numbers(relax, "relax"):
        if not bool(np.isfinite(value).all()):
            raise InvalidStepRuleError(
                f"{source} stores a non-finite step rule ({where} = {value if np.ndim(value) == 0 else 'NaN/inf'}), "
                f"as a diverged --step learned run writes; {advice}"
            )
    # The rule's own checks (eta > 0, ...) by rebuilding it; a name this ase-bptt does not know (a
    # plugin not imported yet) is left to the places that need the rule, which say so.
    from ase_bptt.relax.registry import rule_from_relax_settings, step_rule_names

    step = relax.get("step")
    if (step if isinstance(step, dict) else relax).get("step") in step_rule_names():
        try:
            rule_from_relax_settings(relax)
        except (ValueError, TypeError, KeyError) as e:  # StepRuleError is a ValueError
            raise InvalidStepRuleError(f"{source}: the stored step rule cannot be used ({e}); {advice}") from None
    tol, max_steps = relax.get("tol"), relax.get("max_steps")
    if tol is not None and not (isinstance(tol, (int, float)) and tol > 0):
        raise InvalidStepRuleError(f"{source}: the stored tol must be a positive distance in A, got {tol!r}")
    if max_steps is not None and not (isinstance(max_steps, (int, float)) and max_steps >= 1):
        raise InvalidStepRuleError(f"{source}: the stored max_steps must be a positive integer, got {max_steps!r}")


def _numbers(value: Any, where: str) -> list[tuple[str, Any]]:
    """Every float and floating tensor inside ``value`` (dicts and lists walked), with where it is."""
    if isinstance(value, float):
        return [(where, value)]
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return [(where, value.detach().cpu().numpy())]
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in _numbers(v, f"{where}.{k}")]
    if isinstance(value, (list, tuple)):
        return [n for i, v in enumerate(value) for n in _numbers(v, f"{where}[{i}]")]
    return []


def validate_checkpoint(data: Any, *, source: str = "checkpoint") -> dict:
    """Check the layout of an already loaded checkpoint dict; errors name ``source``."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        what = (
            "a plain state dict"
            if isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values())
            else f"a {type(data).__name__}"
        )
        raise NotACheckpointError(
            f"{source} is not an ase-bptt checkpoint (it holds {what}, without format='{FORMAT}'); "
            "build the model and save it with ase_bptt.models.checkpoint.save_checkpoint"
        )
    version = data.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise CheckpointVersionError(
            f"{source} has format_version {version}, newer than this ase-bptt supports ({FORMAT_VERSION}); "
            "upgrade ase-bptt (pip install -U ase-bptt)"
        )
    missing = [k for k in _REQUIRED if k not in data]
    model = data.get("model")
    if isinstance(model, dict):
        missing += [f"model.{k}" for k in _REQUIRED_MODEL if k not in model]
    elif "model" in data:
        raise CorruptCheckpointError(f"{source}: 'model' is a {type(model).__name__}, expected a dict")
    if missing:
        raise CheckpointKeyError(f"{source} lacks required entries {missing}; it is incomplete, re-save it")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CorruptCheckpointError(f"{source} has an invalid format_version {version!r}")
    _check_relax(data["relax"], source)
    return data


def load_model(
    source: str | os.PathLike | dict,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    name: str | None = None,
) -> nn.Module:
    """Rebuild the model in a checkpoint, in eval mode.

    Args:
        source: a checkpoint path or an already loaded checkpoint dict.
        name: what errors call ``source`` (e.g. the path a dict was loaded
            from; default: the path, or "checkpoint dict").
        device: where to put the model (default CPU).
        dtype: floating dtype (default: the dtype the weights were saved in,
            so outputs are bitwise identical to the saved model's).

    Raises:
        CheckpointError: any of the :func:`load_checkpoint` errors;
            UnknownModelError for an unregistered model name;
            CheckpointKeyError when the weights do not match the config;
            NonFiniteWeightsError when they hold NaN or infinite numbers.
        ModelDependencyError: the model needs a package that is missing or at another version
            (a universal model's backend, ``pip install 'ase-bptt[chgnet]'``); the message starts
            with the file's name.
    """
    if isinstance(source, dict):
        name_of = name or "checkpoint dict"
        checkpoint = validate_checkpoint(source, source=name_of)
    else:
        name_of = name or str(source)
        checkpoint = load_checkpoint(source)
    spec = checkpoint["model"]
    cls = MODEL_REGISTRY.get(spec["name"])
    if cls is None:
        raise UnknownModelError(
            f"{name_of} holds a {spec['name']!r} model, unknown to this ase-bptt "
            f"(known: {sorted(MODEL_REGISTRY)}); upgrade ase-bptt or import the package that registers it"
        )
    try:
        model = cast(Any, cls).from_config(spec["config"])  # register_model checked it has one
    except ModelDependencyError as e:
        raise type(e)(f"{name_of}: {e}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointKeyError(f"{name_of}: model config cannot be used ({e})") from None
    state = spec["state_dict"]
    bad = [
        k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and not v.isfinite().all()
    ]
    if bad:
        raise NonFiniteWeightsError(
            f"{name_of} holds NaN or infinite weights (in {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}), "
            "so every prediction would be NaN; use the checkpoint of an earlier epoch or re-run the training "
            "(e.g. with a lower learning rate)"
        )
    saved = next((v.dtype for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
    if saved is not None:
        model.to(saved)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointKeyError(f"{name_of}: weights do not match the {spec['name']} config: {e}") from None
    model.to(device=device, dtype=dtype)
    return model.eval()
