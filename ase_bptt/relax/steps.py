"""Step rules: the PES-level update a relaxer applies to the predicted forces.

One frame of a relaxation is ``X[t+1] = X[t] + update``; a step rule turns the
forces ``F`` at ``X[t]`` into ``update``. The rules here are ``nn.Module``s with
explicit state passed in and out (so a rollout can checkpoint frames and every
structure in a batch keeps its own state):

``state = rule.init_state(batch, positions)`` once, then every frame
``update, state = rule(positions, forces, batch, state, frame, noise=eps)``.

Every rule shares the same options, applied in this order:

1. step size ``eta_k = eta * anneal**k`` on frame ``k`` (annealing),
2. momentum ``d_k = (1 - w) * eta_k * F + w * d_{k-1}`` with ``d_{-1} = 0``,
3. exploration noise ``d_k + noise * eps`` (only in training mode, ``eps``
   standard normal, drawn by the caller so it can be seeded and replayed),
4. the ``maxstep`` cap: the whole structure's update is rescaled by
   ``min(1, maxstep / largest atom displacement)``. This is a differentiable
   rescaling, never a clip of single atoms, so the update keeps its direction.

Forces passed in are expected to be zero on fixed and padding atoms (the
relaxers do that); the update is zeroed there again for safety.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ase_bptt import metrics
from ase_bptt.batch import Batch
from ase_bptt.relax.defaults import DEFAULT_ETA, DEFAULT_MAX_STEPS, DEFAULT_TOL

__all__ = [
    "DEFAULT_ETA",
    "StepRule",
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


State = dict[str, torch.Tensor]


def safe_norm(x: torch.Tensor, dim: int | tuple[int, ...] = -1) -> torch.Tensor:
    """Euclidean norm over ``dim`` whose gradient is 0 (not NaN) at ``x == 0``."""
    sq = (x * x).sum(dim=dim)
    positive = sq > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, sq, torch.ones_like(sq))), torch.zeros_like(sq))


def cap_displacement(update: torch.Tensor, maxstep: float | None) -> torch.Tensor:
    """Rescale each structure's ``(B, N, 3)`` update so no atom moves more than ``maxstep``.

    ``scale = min(1, maxstep / max_i |u_i|)`` per structure; differentiable
    (the largest norm is epsilon-safe) and direction preserving.
    """
    if maxstep is None or math.isinf(maxstep):
        return update
    largest = safe_norm(update, dim=-1).amax(dim=-1)
    scale = maxstep / torch.clamp(largest, min=maxstep)
    return update * scale[:, None, None]


def _check_options(momentum: float, anneal: float, noise: float, maxstep: float | None) -> None:
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}; the paper used 0.05.")
    if not anneal > 0.0:
        raise ValueError(f"anneal must be positive, got {anneal}; use 1.0 for no annealing (the paper tried 0.99).")
    if not noise >= 0.0:
        raise ValueError(f"noise must be >= 0 (a standard deviation in A), got {noise}.")
    if maxstep is not None and not maxstep > 0.0:
        raise ValueError(f"maxstep must be positive (A) or None for no cap, got {maxstep}.")


class StepRule(nn.Module):
    """Base class of step rules (see the module docstring for the update).

    Subclasses implement :meth:`step_size` (a float, a 0-d tensor or one
    value per structure, ``(B,)``) and a ``to_dict`` that ``step_rule_from_dict`` reads.

    Args:
        momentum: weight ``w`` of the previous direction, in ``[0, 1)``.
        anneal: multiplicative step annealing ``gamma`` (``eta_k = eta * gamma**k``).
        noise: standard deviation (A) of Gaussian noise added to each atom's
            update while the rule is in training mode.
        maxstep: largest displacement of any atom in one frame (A); None disables.
    """

    name: str = ""

    def __init__(
        self, *, momentum: float = 0.0, anneal: float = 1.0, noise: float = 0.0, maxstep: float | None = 0.2
    ) -> None:
        super().__init__()
        _check_options(momentum, anneal, noise, maxstep)
        self.momentum = float(momentum)
        self.anneal = float(anneal)
        self.noise = float(noise)
        self.maxstep = None if maxstep is None else float(maxstep)

    # ---------------------------------------------------------------- state
    def init_state(self, batch: Batch, positions: torch.Tensor, forces: torch.Tensor | None = None) -> State:
        """State before the first frame (tensors only, one entry per structure)."""
        if self.momentum > 0.0:
            return {"direction": torch.zeros_like(positions)}
        return {}

    @property
    def wants_noise(self) -> bool:
        """True when the next frames draw exploration noise (training mode and noise > 0)."""
        return self.training and self.noise > 0.0

    # --------------------------------------------------------------- update
    def step_size(
        self, positions: torch.Tensor, forces: torch.Tensor, batch: Batch, state: State, frame: int
    ) -> torch.Tensor:
        """Step size before annealing: a float, a 0-d tensor or one value per structure ``(B,)``."""
        raise NotImplementedError

    def forward(
        self,
        positions: torch.Tensor,
        forces: torch.Tensor,
        batch: Batch,
        state: State,
        frame: int,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, State]:
        """One frame's update.

        Args:
            positions: ``(B, N, 3)`` current positions.
            forces: ``(B, N, 3)`` forces at ``positions``, zero on fixed/padding atoms.
            batch: the structures (masks, cell).
            state: from :meth:`init_state` or the previous frame.
            frame: frame index ``k`` (0 for the first update), for annealing.
            noise: standard-normal ``(B, N, 3)`` draws, used when :attr:`wants_noise`.

        Returns:
            ``(update, new_state)``; ``update`` is zero on fixed and padding atoms.
        """
        eta = self.step_size(positions, forces, batch, state, frame)
        if self.anneal != 1.0:
            eta = eta * self.anneal**frame
        if isinstance(eta, torch.Tensor):
            eta = eta.to(forces.dtype)
            if eta.dim() == 1:
                eta = eta[:, None, None]
        direction = eta * forces
        new_state: State = {}
        if self.momentum > 0.0:
            direction = (1.0 - self.momentum) * direction + self.momentum * state["direction"]
            new_state["direction"] = direction
        update = direction
        if noise is not None and self.wants_noise:
            update = update + self.noise * noise
        update = torch.where(batch.movable[..., None], update, torch.zeros_like(update))
        return cap_displacement(update, self.maxstep), new_state

    # ------------------------------------------------------------ utilities
    def step_parameters(self) -> list[nn.Parameter]:
        """The rule's own trainable parameters (give them their own optimizer group and clipping)."""
        return [p for p in self.parameters() if p.requires_grad]

    def _options(self) -> dict[str, Any]:
        return {"momentum": self.momentum, "anneal": self.anneal, "noise": self.noise, "maxstep": self.maxstep}

    def to_dict(self) -> dict[str, Any]:
        """JSON-like values and tensors only, enough for :func:`step_rule_from_dict` to rebuild the rule."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self._options().items())


class FixedStep(StepRule):
    """``X <- X + eta * F`` with a constant step size ``eta`` (A^2/eV)."""

    name = "fixed"

    def __init__(self, eta: float = DEFAULT_ETA, **options: Any) -> None:
        super().__init__(**options)
        if not eta > 0.0:
            raise ValueError(f"eta must be positive, got {eta}.")
        self.eta = float(eta)

    def step_size(self, positions, forces, batch, state, frame):
        return self.eta  # a Python float: no tensor to build or copy to the device every frame

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.name, "eta": self.eta, **self._options()}

    def extra_repr(self) -> str:
        return f"eta={self.eta}, " + super().extra_repr()


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
                raise ValueError(f"eta0 must be positive, got {eta0}.")
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
            raise ValueError(f"eta0 must be positive, got {eta0}.")
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads}).")
        self.eta0 = float(eta0)
        self.config = {
            "d_model": int(d_model),
            "n_heads": int(n_heads),
            "d_ff": int(d_ff),
            "dropout": float(dropout),
            "force_scale": float(force_scale),
            "length_scale": float(length_scale),
        }
        kw = {"dtype": dtype or torch.get_default_dtype()}
        self.lift0 = nn.Linear(self.n_features, d_model, **kw)
        self.lift1 = nn.Linear(d_model, d_model, **kw)
        self.lift2 = nn.Linear(self.n_features, d_model, bias=False, **kw)
        self.query = nn.Parameter(torch.ones(1, 1, d_model, **kw))
        self.attention = nn.MultiheadAttention(d_model, n_heads, dropout=0.0, batch_first=True, **kw)
        self.norm0 = nn.LayerNorm(d_model, **kw)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff, **kw), nn.SiLU(), nn.Linear(d_ff, d_model, **kw))
        self.norm1 = nn.LayerNorm(d_model, **kw)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(d_model, 1, **kw)
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

    def extra_repr(self) -> str:
        return (
            f"eta0={self.eta0}, " + ", ".join(f"{k}={v}" for k, v in self.config.items()) + ", " + super().extra_repr()
        )


_RELAX_ONLY_KEYS = ("step", "tol", "max_steps")


def step_rule_from_dict(d: dict[str, Any]) -> StepRule:
    """Rebuild a step rule from :meth:`StepRule.to_dict` output (or a checkpoint's ``relax`` dict).

    Raises:
        ValueError: the dict names no step rule or an unknown one.
    """
    from ase_bptt.relax.fire import FIREStep

    kind = d.get("step")
    options = {k: d[k] for k in ("momentum", "anneal", "noise", "maxstep") if k in d}
    if kind == "fixed":
        return FixedStep(d.get("eta", DEFAULT_ETA), **options)
    if kind == "learned":
        # float64 keeps the saved value exactly; callers cast with .to(dtype).
        return LearnedStep(d.get("eta", DEFAULT_ETA), log_eta=d.get("log_eta"), dtype=torch.float64, **options)
    if kind == "decoder":
        config = {k: d[k] for k in ("d_model", "n_heads", "d_ff", "dropout", "force_scale", "length_scale") if k in d}
        state_dict = d.get("state_dict")
        dtype = None
        if state_dict:
            dtype = next(iter(v for v in state_dict.values() if v.is_floating_point()), torch.empty(0)).dtype
        rule = DecoderStep(d.get("eta", DEFAULT_ETA), dtype=dtype, **config, **options)
        if state_dict:
            rule.load_state_dict(state_dict)
        return rule
    if kind == "fire":
        return FIREStep.from_dict(d)
    raise ValueError(
        f"unknown step rule {kind!r} in the relax settings; expected one of 'fixed', 'learned', "
        "'decoder', 'fire'. The checkpoint may come from a newer ase-bptt: upgrade, or pass eta explicitly."
    )


def make_step_rule(
    spec: str | StepRule | dict[str, Any],
    *,
    eta: float | None = None,
    maxstep: float | None = 0.2,
    momentum: float = 0.0,
    anneal: float = 1.0,
    noise: float = 0.0,
) -> StepRule:
    """Build a step rule from a name (``"fixed"``, ``"learned"``, ``"decoder"``, ``"fire"``).

    A ``StepRule`` is returned unchanged; a dict goes to :func:`step_rule_from_dict`.
    ``eta`` (A^2/eV) is the fixed step, or the initial value of a learned or
    decoder step; None means :data:`DEFAULT_ETA`. FIRE has its own time step
    and takes no ``eta``, momentum or annealing.

    Raises:
        ValueError: an unknown name, or options the rule does not take.
    """
    if isinstance(spec, StepRule):
        return spec
    if isinstance(spec, dict):
        return step_rule_from_dict(spec)
    options = {"momentum": momentum, "anneal": anneal, "noise": noise, "maxstep": maxstep}
    if spec == "fire" and eta is not None:
        raise ValueError("FIRE takes no eta (it adapts its own time step); build FIREStep(dt=...) to change it.")
    eta = DEFAULT_ETA if eta is None else eta
    if spec == "fixed":
        return FixedStep(eta, **options)
    if spec == "learned":
        return LearnedStep(eta, **options)
    if spec == "decoder":
        return DecoderStep(eta, **options)
    if spec == "fire":
        from ase_bptt.relax.fire import FIREStep

        if momentum != 0.0 or anneal != 1.0:
            raise ValueError(
                "FIRE has its own velocity mixing; momentum and anneal apply only to "
                "'fixed', 'learned' and 'decoder' steps."
            )
        return FIREStep(maxstep=0.2 if maxstep is None else maxstep, noise=noise)
    raise ValueError(f"unknown step rule {spec!r}; choose 'fixed', 'learned', 'decoder' or 'fire', or pass a StepRule.")


def relax_settings(rule: StepRule, *, tol: float = DEFAULT_TOL, max_steps: int = DEFAULT_MAX_STEPS) -> dict[str, Any]:
    """A checkpoint's ``relax`` dict: ``{"step": rule.to_dict(), "tol": tol, "max_steps": max_steps}``."""
    return {"step": rule.to_dict(), "tol": float(tol), "max_steps": int(max_steps)}


def rule_from_relax_settings(settings: dict[str, Any]) -> tuple[StepRule, float | None, int | None]:
    """``(rule, tol, max_steps)`` from a checkpoint's ``relax`` dict.

    Accepts the nested layout written by :func:`relax_settings` and a flat one
    (the rule's keys next to ``tol`` and ``max_steps``).
    """
    step = settings.get("step")
    rule_dict = step if isinstance(step, dict) else settings
    return step_rule_from_dict(rule_dict), settings.get("tol"), settings.get("max_steps")
