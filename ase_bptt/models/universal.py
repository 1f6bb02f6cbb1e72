"""A universal MLIP (CHGNet, SevenNet, ... through :mod:`ase_bptt.backends`) as a ForceModel and a checkpoint.

    model = load_universal_model("chgnet")            # CHGNet 0.3.0, from the weights in its wheel
    rollout(model, batch, FixedStep(0.05))             # BPTT through it like through ADAPT
    save_checkpoint("tuned.pt", model, relax=...)      # -> BPTTCalculator("tuned.pt")

:class:`UniversalModel` is ``ConservativeForces`` around a backend's energy
model, so forces are ``-dE/dX`` with ``create_graph=True`` while training.
Its config records what a checkpoint needs to rebuild it and to refuse a
different package: the backend, the pretrained model's name (or the settings
of an untrained architecture), the backend package's version, the sha256 of
the shipped weight file it started from, and the skin. The tuned weights are
the checkpoint's ``state_dict`` as for every model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ase_bptt.backends.registry import (
    DEFAULT_SKIN,
    Backend,
    BackendError,
    BackendVersionError,
    backend_class,
    sha256_of,
)
from ase_bptt.models.base import ModelConfig
from ase_bptt.models.conservative import ConservativeForces

__all__ = ["UniversalConfig", "UniversalModel", "load_universal_model", "base_model"]


@dataclass
class UniversalConfig(ModelConfig):
    """What rebuilds a :class:`UniversalModel` (stored in its checkpoint, JSON-like via :meth:`to_dict`).

    Attributes:
        backend: registered backend name (``"chgnet"``, ``"sevenn"``).
        model: the pretrained model the weights started from (``"0.3.0"``, ``"7net-0"``), or
            None for an untrained ``architecture``.
        architecture: the backend's JSON-like settings of an untrained model (when ``model`` is None).
        package_version: version of the backend's package the model was built with; a checkpoint
            loads only under the same version.
        base_sha256: sha256 of the pretrained weight file inside that package (None without one).
        skin: neighbour-graph skin (A): the graph is built at ``cutoff + skin`` and rebuilt
            once an atom has moved ``skin / 2``.
    """

    backend: str = "chgnet"
    model: str | None = None
    architecture: dict[str, Any] | None = None
    package_version: str = ""
    base_sha256: str | None = None
    skin: float = DEFAULT_SKIN

    def __post_init__(self) -> None:
        self.skin = float(self.skin)
        if (self.model is None) == (self.architecture is None):
            raise ValueError("a universal model needs exactly one of a pretrained model name and an architecture")


class UniversalModel(ConservativeForces):
    """A backend's energy model as a ForceModel (``-dE/dX``), registered for checkpoints as ``"universal"``.

    Build one with :func:`load_universal_model`; checkpoints rebuild it with :meth:`from_config`.
    Parameter names start with ``energy_model.net.`` followed by the package's own names (e.g.
    ``energy_model.net.atom_embedding`` for CHGNet): the prefixes ``finetune``'s freeze takes.
    """

    model_name = "universal"
    energy_model: Backend

    def __init__(self, config: UniversalConfig, backend: Backend) -> None:
        super().__init__(backend)
        self.config = config

    @classmethod
    def from_config(cls, config: dict) -> UniversalModel:
        """Rebuild from :meth:`UniversalConfig.to_dict` output (used by checkpoints; weights are loaded after).

        Raises:
            BackendMissingError: the backend's package is not installed.
            BackendVersionError: another version of it is installed, or its weight file differs.
        """
        cfg = UniversalConfig.from_dict(config)
        backend = backend_class(cfg.backend)
        backend.check_version(cfg.package_version)
        if cfg.model is not None:
            net = backend.load_pretrained(cfg.model)
            _check_weights(backend, cfg)
        else:
            net = backend.from_architecture(dict(cfg.architecture or {}))
        return cls(cfg, backend(net, skin=cfg.skin, architecture=cfg.architecture))

    @property
    def backend(self) -> Backend:
        """The backend energy model (its ``net`` is the package's torch model, its ``graph`` the neighbour cache)."""
        return self.energy_model

    def memory_floats(self) -> tuple[int, int]:
        """Floats one atom keeps per frame (with gradients, without): the batch-size estimate's hook."""
        return self.energy_model.memory_floats


def _check_weights(backend: type[Backend], cfg: UniversalConfig) -> None:
    assert cfg.model is not None
    sha = sha256_of(backend.weight_file(cfg.model))
    if cfg.base_sha256 is not None and sha != cfg.base_sha256:
        raise BackendVersionError(
            f"the installed {backend.package} ships other {cfg.model} weights (sha256 {sha[:12]}...) than the "
            f"model was tuned from ({cfg.base_sha256[:12]}...): pip install '{backend.package}=={cfg.package_version}'"
        )


def load_universal_model(
    name: str = "chgnet",
    *,
    model: str | None = None,
    architecture: dict[str, Any] | None = None,
    skin: float = DEFAULT_SKIN,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> UniversalModel:
    """A universal MLIP as a ForceModel, in eval mode, ready for ``rollout``, the relaxer and the calculator.

    Args:
        name: the backend (:func:`ase_bptt.backends.backend_names`): ``"chgnet"`` or ``"sevenn"``.
        model: the pretrained weights shipped with the package (default: the backend's
            ``default_model``, e.g. CHGNet ``"0.3.0"``, SevenNet ``"7net-0"``); no download.
        architecture: build an untrained model from these settings instead (e.g. a small CHGNet
            for tests: ``{"atom_fea_dim": 8, ...}``, the keyword arguments of ``CHGNet``).
        skin: neighbour-graph skin (A).
        device: where the model runs (default CPU).
        dtype: floating dtype (default: the package's, float32).

    Raises:
        BackendError: unknown backend or pretrained-model name, or both ``model`` and ``architecture``.
        BackendMissingError: the backend's package is not installed (one line naming the pip extra).
    """
    backend = backend_class(name)
    if model is not None and architecture is not None:
        raise BackendError(f"{name}: give a pretrained model or an architecture, not both")
    version = backend.installed_version()
    if architecture is None:
        model = model or backend.default_model
        net = backend.load_pretrained(model)
        sha: str | None = sha256_of(backend.weight_file(model))
    else:
        net, sha = backend.from_architecture(dict(architecture)), None
    config = UniversalConfig(
        backend=name, model=model, architecture=architecture, package_version=version, base_sha256=sha, skin=skin
    )
    out = UniversalModel(config, backend(net, skin=skin, architecture=architecture))
    out.to(device=device, dtype=dtype)
    return out.eval()


def base_model(tuned: UniversalModel) -> UniversalModel:
    """The untouched pretrained model ``tuned`` started from (same backend, weights, skin, device and dtype).

    Raises:
        BackendError: ``tuned`` was built from an untrained architecture (it has no pretrained base).
        BackendVersionError: the installed package ships other weights than ``tuned`` started from.
    """
    cfg = tuned.config
    if cfg.model is None:
        raise BackendError(f"this {cfg.backend} model was built from an architecture, not pretrained weights")
    backend = backend_class(cfg.backend)
    backend.check_version(cfg.package_version)
    _check_weights(backend, cfg)
    ref = next(iter(tuned.parameters()))
    return load_universal_model(cfg.backend, model=cfg.model, skin=cfg.skin, device=ref.device, dtype=ref.dtype)
