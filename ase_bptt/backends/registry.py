"""The backend registry: one name -> class map of foundation-model backends, and their base class.

A backend turns a foundation-model package's torch model (CHGNet, SevenNet, ...)
into an energy model of positions: ``backend(batch, positions) -> energy (B,)``
in eV, differentiable to second order, ignoring padding atoms. The neighbour
graph is built outside torch (:class:`~ase_bptt.backends.graph.GraphCache`) and
the edge vectors are recomputed from ``positions`` in every call, so
``ConservativeForces`` (in :mod:`ase_bptt.models.universal`) gets ``-dE/dX``
and BPTT gets its second derivatives. Adding a backend is one subclass plus
:func:`register_backend`::

    @register_backend
    class MyBackend(Backend):
        name = "mymlip"
        package = "mymlip"
        default_model = "v1"
        ...

Importing :mod:`ase_bptt.backends` registers the built-in backends (``chgnet``,
``sevenn``) without importing their packages, which load only when a model is built.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import types
from collections.abc import Iterator
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import nn

from ase_bptt.backends.graph import GraphCache
from ase_bptt.batch import Batch
from ase_bptt.errors import AseBpttError, ModelDependencyError
from ase_bptt.registry import Registry

__all__ = [
    "DEFAULT_SKIN",
    "Backend",
    "BackendError",
    "BackendMissingError",
    "BackendVersionError",
    "register_backend",
    "unregister_backend",
    "backend_names",
    "backend_class",
    "sha256_of",
    "keep_default_dtype",
    "quiet",
]

#: Default skin (A) added to a backend's cutoff when its neighbour graph is built.
DEFAULT_SKIN = 0.5


class BackendError(AseBpttError, ValueError):
    """An unknown backend or pretrained-model name, or a structure a backend cannot take."""


class BackendMissingError(ModelDependencyError, ImportError):
    """The package behind a backend is not installed (the message names the pip extra)."""


class BackendVersionError(ModelDependencyError):
    """The installed backend package (or its shipped weights) differs from the one a model was tuned with."""


@contextlib.contextmanager
def keep_default_dtype() -> Iterator[None]:
    """Restore torch's global default dtype on exit (a backend package must never change it for ase-bptt)."""
    saved = torch.get_default_dtype()
    try:
        yield
    finally:
        if torch.get_default_dtype() != saved:
            torch.set_default_dtype(saved)


@lru_cache(maxsize=16)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file (cached per path, size and modification time)."""
    stat = Path(path).stat()
    return _sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)


class Backend(nn.Module):
    """Base class: a foundation model's torch module (``self.net``) as an energy model of positions.

    Subclasses set the class attributes and implement the hooks below; the base
    class owns the neighbour-graph cache (built with ``cutoff + skin``, rebuilt
    when an atom has moved more than ``skin / 2``; see
    :class:`~ase_bptt.backends.graph.GraphCache`).

    Class attributes:
        name: registry key (``"chgnet"``).
        package: the Python distribution whose version a checkpoint records (``"chgnet"``).
        extra: the ase-bptt extra that installs it (``pip install 'ase-bptt[<extra>]'``).
        default_model: the pretrained model used when none is named.
        memory_floats: floats one atom keeps per frame (with gradients for BPTT, without), set
            above the measured need of the densest crystal measured, for the batch-size estimate.
        small_architecture: a small untrained architecture with every layer type of the package
            (a few thousand parameters), for tests and ``--quick`` benchmarks.

    Args:
        net: the package's torch model.
        skin: added to the cutoff when the neighbour graph is built (A).
        architecture: the JSON-like settings that rebuild an untrained ``net``
            (None for pretrained weights, rebuilt from the installed package).
    """

    #: the package's torch model (CHGNet, AtomGraphSequential, ...): typed by its package, not here
    net: Any
    name: ClassVar[str] = ""
    package: ClassVar[str] = ""
    extra: ClassVar[str] = ""
    default_model: ClassVar[str] = ""
    memory_floats: ClassVar[tuple[int, int]] = (0, 0)
    small_architecture: ClassVar[dict[str, Any]] = {}

    def __init__(self, net: nn.Module, *, skin: float = DEFAULT_SKIN, architecture: dict | None = None) -> None:
        super().__init__()
        if not np.isfinite(skin) or skin < 0:
            raise BackendError(f"{self.name}: the skin must be a finite distance >= 0 A, got {skin}")
        self.net = net
        self.skin = float(skin)
        self.architecture = architecture
        self.graph = GraphCache(self.skin)

    # ------------------------------------------------------------ package hooks
    @classmethod
    def import_package(cls) -> types.ModuleType:
        """Import the backend's package (default: ``package``), or raise :class:`BackendMissingError`."""
        try:
            with keep_default_dtype():
                return importlib.import_module(cls.package)
        except ImportError as exc:
            raise BackendMissingError(
                f"the {cls.name} backend needs the {cls.package} package, which is not installed "
                f"({exc}): pip install 'ase-bptt[{cls.extra or cls.package}]'"
            ) from None

    @classmethod
    def installed_version(cls) -> str:
        """The installed version of ``package`` (imports it first, so a missing package is one clear error)."""
        cls.import_package()
        return metadata.version(cls.package)

    @classmethod
    def check_version(cls, version: str) -> None:
        """Raise :class:`BackendVersionError` unless ``version`` of ``package`` is the installed one."""
        installed = cls.installed_version()
        if installed != version:
            raise BackendVersionError(
                f"the model was tuned with {cls.package} {version}, but {cls.package} {installed} is "
                f"installed (its model code or weights may differ): pip install '{cls.package}=={version}'"
            )

    @classmethod
    def pretrained_names(cls) -> tuple[str, ...]:
        """Names of the pretrained models whose weights ship inside the installed package."""
        raise NotImplementedError

    @classmethod
    def weight_file(cls, model: str) -> Path:
        """The file inside the installed package that holds ``model``'s weights."""
        raise NotImplementedError

    @classmethod
    def load_pretrained(cls, model: str) -> nn.Module:
        """The package's torch model with the pretrained weights ``model``, on CPU."""
        raise NotImplementedError

    @classmethod
    def from_architecture(cls, architecture: dict[str, Any]) -> nn.Module:
        """An untrained torch model built from JSON-like settings (small models for tests)."""
        raise NotImplementedError

    @classmethod
    def check_model_name(cls, model: str) -> None:
        """Raise :class:`BackendError` for a pretrained name the installed package does not ship."""
        names = cls.pretrained_names()
        if model not in names:
            raise BackendError(
                f"{cls.name} has no pretrained model {model!r}; the installed {cls.package} ships "
                f"{', '.join(repr(n) for n in names)}"
            )

    # ----------------------------------------------------------- model hooks
    @property
    def cutoff(self) -> float:
        """The largest interaction distance of the model (A)."""
        raise NotImplementedError

    @property
    def species(self) -> tuple[int, ...]:
        """Atomic numbers the model can evaluate."""
        raise NotImplementedError

    def build_graph(self, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, numbers: np.ndarray) -> Any:
        """One structure's neighbour graph at ``cutoff + skin`` (NumPy or the package's own code)."""
        raise NotImplementedError

    def assemble(self, graphs: list[Any], batch: Batch) -> Any:
        """The per-structure graphs joined into one batched graph of torch tensors on ``batch.device``."""
        raise NotImplementedError

    def energy(self, batch: Batch, positions: torch.Tensor, graph: Any) -> torch.Tensor:
        """Total energy ``(B,)`` in eV; edge vectors from ``positions``, pairs beyond the cutoff dropped."""
        raise NotImplementedError

    def forward(self, batch: Batch, positions: torch.Tensor) -> torch.Tensor:
        """Total energy ``(B,)`` in eV of the structures in ``batch`` at ``positions`` ``(B, N, 3)``."""
        graph = self.graph.get(batch, positions, self.build_graph, self.assemble)
        return self.energy(batch, positions, graph)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence a package's stdout banners (CHGNet prints its size); the CLI's tables own stdout."""
    with contextlib.redirect_stdout(io.StringIO()), keep_default_dtype():
        yield


# ------------------------------------------------------------------- registry
_BACKENDS: Registry[type[Backend]] = Registry("universal-model backend", BackendError)

B = TypeVar("B", bound=type[Backend])


def register_backend(cls: B) -> B:
    """Class decorator: make ``cls`` known by ``cls.name`` (to checkpoints, ``load_universal_model`` and the CLI).

    Raises:
        BackendError: the class has no name, or another class holds it.
    """
    _BACKENDS.register(cls)
    return cls


def unregister_backend(name: str) -> None:
    """Forget the backend registered as ``name`` (tests and plugins clean up with this)."""
    _BACKENDS.unregister(name)


def backend_names() -> tuple[str, ...]:
    """The registered backend names, in registration order (``"chgnet"`` first)."""
    return _BACKENDS.names()


def backend_class(name: Any) -> type[Backend]:
    """The class registered as ``name``.

    Raises:
        BackendError: no backend has that name.
    """
    return _BACKENDS.get(name)
