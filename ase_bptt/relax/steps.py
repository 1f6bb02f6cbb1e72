"""The step-size rules: fixed, learned and decoder (the paper's Eq. 1 and Appendix A).

Each is a :class:`~ase_bptt.relax.base.StepRule` giving a step size ``eta``
(the update is ``eta * F`` with the shared momentum, annealing, noise and
``maxstep`` options, see the base class) and registered by name in
:mod:`ase_bptt.relax.registry`. FIRE lives in :mod:`ase_bptt.relax.fire`.

This module also re-exports the base and registry names it used to hold, so
``from ase_bptt.relax.steps import StepRule, make_step_rule, ...`` keeps working.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ase_bptt import metrics
from ase_bptt.batch import Batch
from ase_bptt.relax.base import State, StepRule, StepRuleError, cap_displacement, safe_norm
from ase_bptt.relax.defaults import DEFAULT_ETA
from ase_bptt.relax.registry import (
    make_step_rule,
    register_step_rule,
    relax_settings,
    rule_from_relax_settings,
    step_rule_from_dict,
)

__all__ = [
    "DEFAULT_ETA",
    "State",
    "StepRule",
    "StepRuleError",
    "FixedStep",
    "LearnedStep",
    "DecoderStep",
    "make_step_rule",
    "step_rule_from_dict",
    "safe_norm",
    "cap_displacement",
    "relax_settings",
    "rule_from_relax_settings",
]


@register_step_rule
class FixedStep(StepRule):
    """``X <- X + eta * F`` with a constant step size ``eta`` (A^2/eV)."""

    name = "fixed"

    def __init__(self, eta: float = DEFAULT_ETA, **options: Any) -> None:
        super().__init__(**options)
        if not eta > 0.0:
            raise StepRuleError(f"eta must be positive, got {eta}.")
        self.eta = float(eta)

    def step_size(self, positions, forces, batch, state, frame):
        return self.eta  # a Python float: no tensor to build or copy to the device every frame

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.name, "eta": self.eta, **self._options()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FixedStep:
        return cls(d.get("eta", DEFAULT_ETA), **cls.options_from_dict(d))

    def extra_repr(self) -> str:
        return f"eta={self.eta}, " + super().extra_repr()


@register_step_rule
class LearnedStep(StepRule):
    """A trainable positive scalar step size, ``eta = exp(log_eta)``.

    Its parameter is separate from the model's (:meth:`step_parameters`):
    clipping both together froze eta in our tests, so training gives it its
    own optimizer group and clipping.
    """

    name = "learned"

    def __init__(
        self,
        eta0: float = DEFAULT_ETA,
        *,
        log_eta: float | None = None,
        dtype: torch.dtype | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if log_eta is None:
            if not eta0 > 0.0:
                raise StepRuleError(f"eta0 must be positive, got {eta0}.")
            log_eta = math.log(eta0)
        self.log_eta = nn.Parameter(torch.tensor(float(log_eta), dtype=dtype or torch.get_default_dtype()))

    @property
    def eta(self) -> torch.Tensor:
        """The current step size (differentiable, always positive)."""
        return torch.exp(self.log_eta)

    def step_size(self, positions, forces, batch, state, frame):
        return torch.exp(self.log_eta.to(forces.dtype))

    def to_dict(self) -> dict[str, Any]:
        log_eta = float(self.log_eta.detach())
        return {"step": self.name, "eta": math.exp(log_eta), "log_eta": log_eta, **self._options()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LearnedStep:
        # float64 keeps the saved value exactly; callers cast with .to(dtype).
        options = cls.options_from_dict(d)
        return cls(d.get("eta", DEFAULT_ETA), log_eta=d.get("log_eta"), dtype=torch.float64, **options)

    def extra_repr(self) -> str:
        return f"eta={float(self.eta.detach()):.6g}, " + super().extra_repr()


def _periodic_features(positions: torch.Tensor, batch: Batch, length_scale: float) -> torch.Tensor:
    """Translation-friendly position features, ``(B, N, 6)``.

    Periodic directions: ``sin`` and ``cos`` of ``2 pi`` times the fractional
    coordinate (invariant to lattice translations of any atom). Non-periodic
    directions: the coordinate relative to the structure's centroid over
    ``length_scale`` in the first slot and 0 in the second.
    """
    pbc = batch.pbc[:, None, :]
    frac, _ = metrics.fractional(positions, batch.cell, batch.pbc)
    mask = batch.mask[..., None].to(positions.dtype)
    centroid = (positions * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
    centred = (positions - centroid) / length_scale
    angle = 2.0 * math.pi * frac
    first = torch.where(pbc, torch.sin(angle), centred)
    second = torch.where(pbc, torch.cos(angle), torch.zeros_like(angle))
    return torch.cat([first, second], dim=-1)


_DECODER_CONFIG_KEYS = ("d_model", "n_heads", "d_ff", "dropout", "force_scale", "length_scale")


@register_step_rule
class DecoderStep(StepRule):
    """The paper's Appendix A head: one positive step size per structure.

    Per atom ``Z = [position features (6) | F / force_scale (3) | |F| / force_scale (1)]``
    (position features: see :func:`_periodic_features`; forces scaled by a
    fixed ``force_scale`` in eV/A so the inputs are O(1)), lifted to
    ``d_model`` by ``H = W2 Z + W1 silu(W0 Z)``; one attention step of a learned
    query ``q`` (initialised to ones, as the paper's dummy tensor) over the real
    atoms; ``h0 = LN(q + Attn(q, H, H))``, ``h1 = LN(h0 + MLP(h0))``,
    ``s = softplus(w . h1 + b + softplus^-1(eta0))``. ``w`` and ``b`` start at
    zero, so the initial step is exactly ``eta0`` for every structure.
    Dropout (``dropout``) follows the attention and the MLP, as in the paper.
    """

    name = "decoder"
    uses_structure = True
    n_features = 10

    def __init__(
        self,
        eta0: float = DEFAULT_ETA,
        *,
        d_model: int = 16,
        n_heads: int = 2,
        d_ff: int = 32,
        dropout: float = 0.0,
        force_scale: float = 1.0,
        length_scale: float = 10.0,
        dtype: torch.dtype | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if not eta0 > 0.0:
            raise StepRuleError(f"eta0 must be positive, got {eta0}.")
        if d_model % n_heads:
            raise StepRuleError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads}).")
        self.eta0 = float(eta0)
        self.config = {
            "d_model": int(d_model),
            "n_heads": int(n_heads),
            "d_ff": int(d_ff),
            "dropout": float(dropout),
            "force_scale": float(force_scale),
            "length_scale": float(length_scale),
        }
        dtype = dtype or torch.get_default_dtype()
        self.lift0 = nn.Linear(self.n_features, d_model, dtype=dtype)
        self.lift1 = nn.Linear(d_model, d_model, dtype=dtype)
        self.lift2 = nn.Linear(self.n_features, d_model, bias=False, dtype=dtype)
        self.query = nn.Parameter(torch.ones(1, 1, d_model, dtype=dtype))
        self.attention = nn.MultiheadAttention(d_model, n_heads, dropout=0.0, batch_first=True, dtype=dtype)
        self.norm0 = nn.LayerNorm(d_model, dtype=dtype)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, d_ff, dtype=dtype), nn.SiLU(), nn.Linear(d_ff, d_model, dtype=dtype)
        )
        self.norm1 = nn.LayerNorm(d_model, dtype=dtype)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(d_model, 1, dtype=dtype)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        # softplus^-1(eta0), so that softplus(0 + offset) == eta0.
        self.offset = math.log(math.expm1(self.eta0))

    def step_size(self, positions, forces, batch, state, frame):
        dtype = self.query.dtype
        scale = self.config["force_scale"]
        z = torch.cat(
            [
                _periodic_features(positions, batch, self.config["length_scale"]),
                forces / scale,
                safe_norm(forces, dim=-1)[..., None] / scale,
            ],
            dim=-1,
        ).to(dtype)
        h = self.lift2(z) + self.lift1(F.silu(self.lift0(z)))
        q = self.query.expand(h.shape[0], 1, h.shape[-1])
        attended, _ = self.attention(q, h, h, key_padding_mask=~batch.mask, need_weights=False)
        h0 = self.norm0(q + self.dropout(attended))
        h1 = self.norm1(h0 + self.dropout(self.mlp(h0)))
        s = F.softplus(self.head(h1)[:, 0, 0] + self.offset)
        return s.to(forces.dtype)

    def to_dict(self) -> dict[str, Any]:
        state = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        return {"step": self.name, "eta": self.eta0, **self.config, **self._options(), "state_dict": state}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DecoderStep:
        config = {k: d[k] for k in _DECODER_CONFIG_KEYS if k in d}
        state_dict = d.get("state_dict")
        dtype = None
        if state_dict:
            dtype = next(iter(v for v in state_dict.values() if v.is_floating_point()), torch.empty(0)).dtype
        rule = cls(d.get("eta", DEFAULT_ETA), dtype=dtype, **config, **cls.options_from_dict(d))
        if state_dict:
            rule.load_state_dict(state_dict)
        return rule

    def extra_repr(self) -> str:
        return (
            f"eta0={self.eta0}, " + ", ".join(f"{k}={v}" for k, v in self.config.items()) + ", " + super().extra_repr()
        )
