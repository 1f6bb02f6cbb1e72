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

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ase_bptt.backends.registry import (
    DEFAULT_SKIN,
    Backend,
    BackendError,
    BackendVersionError,
    backend_class,
    backend_names,
    sha256_of,
)
from ase_bptt.batch import Batch
from ase_bptt.models.base import ModelConfig, ModelOutput
from ase_bptt.models.conservative import ConservativeForces

__all__ = [
    "UniversalConfig",
    "UniversalModel",
    "UniversalInit",
    "load_universal_model",
    "base_model",
    "universal_init",
]


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


#: Frames per forward pass when the energy reference is fitted.
ENERGY_FIT_CHUNK = 8


class UniversalModel(ConservativeForces):
    """A backend's energy model as a ForceModel (``-dE/dX``), registered for checkpoints as ``"universal"``.

    Build one with :func:`load_universal_model`; checkpoints rebuild it with :meth:`from_config`.
    Parameter names start with ``energy_model.net.`` followed by the package's own names (e.g.
    ``energy_model.net.atom_embedding`` for CHGNet): the prefixes ``finetune``'s freeze takes.
    """

    model_name = "universal"
    energy_model: Backend
    energy_reference: torch.Tensor

    def __init__(self, config: UniversalConfig, backend: Backend) -> None:
        super().__init__(backend)
        self.config = config
        # eV per atom of each element (index Z) added to the energy: the reference's zero of energy (a
        # classical potential's, another functional's) is not the base model's; see fit_energy_reference.
        self.register_buffer("energy_reference", torch.zeros(119, dtype=torch.get_default_dtype()))

    def forward(self, batch: Batch, positions: torch.Tensor | None = None) -> ModelOutput:
        """The backend's forces and energy, the energy shifted by :attr:`energy_reference` per atom."""
        out = super().forward(batch, positions)
        if out.energy is None:
            return out
        shift = (self.energy_reference[batch.numbers] * batch.mask).sum(1)
        return ModelOutput(forces=out.forces, energy=out.energy + shift.to(out.energy))

    @torch.no_grad()
    def fit_energy_reference(self, batch: Batch, energy: torch.Tensor) -> dict[str, float]:
        """Fit :attr:`energy_reference` so the model's energies of ``batch`` match ``energy`` (eV) on average per
        element (least squares over the frames' element counts); forces are unchanged.

        Fine-tuning on a reference whose zero of energy differs from the base model's (measured: CHGNet on
        Stillinger-Weber silicon, 1.4 eV/atom apart) would otherwise spend the energy term on a constant.

        Returns:
            ``{"mae_before", "mae_after"}`` in meV/atom on ``batch``.
        """
        self.energy_reference.zero_()
        energies = []
        # No graph kept, and a few frames at a time: 64 CHGNet frames in one pass with the training graph
        # held 11.8 GB (measured; the OOM killer ended the run on a 24 GB machine).
        with torch.no_grad():
            for start in range(0, batch.positions.shape[0], ENERGY_FIT_CHUNK):
                out = self(batch.select(range(start, min(start + ENERGY_FIT_CHUNK, batch.positions.shape[0]))))
                if out.energy is None:
                    raise ValueError("the backend predicts no energy")
                energies.append(out.energy.double())
        predicted = torch.cat(energies)
        counts = torch.stack([(batch.numbers == z).logical_and(batch.mask).sum(1) for z in range(119)], 1).double()
        used = counts.sum(0) > 0
        a, y = counts[:, used], energy.to(predicted) - predicted
        delta = torch.linalg.lstsq(a, y.unsqueeze(1)).solution.squeeze(1)
        self.energy_reference[used] = delta.to(self.energy_reference)
        n = batch.mask.sum(1).double()
        before = float(((y.abs()) / n).mean() * 1000)
        after = float(((y - a @ delta).abs() / n).mean() * 1000)
        return {"mae_before": before, "mae_after": after}

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


# ------------------------------------------------------------------- --init
@dataclass(frozen=True)
class UniversalInit:
    """``--init NAME[:MODEL]``: a training run starts from a backend's shipped pretrained weights.

    Attributes:
        backend: the backend name (``"chgnet"``, ``"sevenn"``).
        model: its pretrained model (None: the backend's default, e.g. CHGNet ``"0.3.0"``).
    """

    backend: str
    model: str | None = None

    def __str__(self) -> str:
        return self.backend if self.model is None else f"{self.backend}:{self.model}"

    def load(self, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> UniversalModel:
        """The untouched pretrained model (:func:`load_universal_model`)."""
        return load_universal_model(self.backend, model=self.model, device=device, dtype=dtype)

    def digest(self) -> str:
        """What identifies the initial model of a run (as a checkpoint's file digest does): the backend, the
        model, the package version and the first 16 hex digits of the weight file's sha256."""
        backend = backend_class(self.backend)
        model = self.model or backend.default_model
        sha = sha256_of(backend.weight_file(model))[:16]
        return f"{self.backend}:{model}:{backend.installed_version()}:{sha}"


def universal_init(init: str | os.PathLike | UniversalInit | None) -> UniversalInit | None:
    """``init`` as a backend's pretrained model (``"chgnet"``, ``"sevenn:7net-0"``), or None when it is None or
    a checkpoint file (an existing file of that name wins over a backend name)."""
    if isinstance(init, UniversalInit):
        return init
    if init is None or isinstance(init, Path) or Path(init).exists():
        return None
    name, _, model = str(init).partition(":")
    if name.lower() not in backend_names():
        return None
    return UniversalInit(name.lower(), model or None)
