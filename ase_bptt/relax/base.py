"""What every step rule shares: the :class:`StepRule` base, epsilon-safe norms and the ``maxstep`` cap.

One frame of a relaxation is ``X[t+1] = X[t] + update``; a step rule turns the
forces ``F`` at ``X[t]`` into ``update``. Rules are ``nn.Module``s with
explicit state passed in and out (so a rollout can checkpoint frames and every
structure in a batch keeps its own state):

``state = rule.init_state(batch, positions)`` once, then every frame
``update, state = rule(positions, forces, batch, state, frame, noise=eps)``.

The rules themselves live in :mod:`ase_bptt.relax.steps` (fixed, learned,
decoder) and :mod:`ase_bptt.relax.fire`; each registers its name in
:mod:`ase_bptt.relax.registry`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ase_bptt.batch import Batch
from ase_bptt.errors import AseBpttError
from ase_bptt.relax.defaults import DEFAULT_ETA, DEFAULT_MAXSTEP, DEFAULT_TOL

__all__ = ["State", "StepRule", "StepRuleError", "safe_norm", "cap_displacement"]

State = dict[str, torch.Tensor]

#: The options every rule takes, stored in its ``to_dict`` next to its own values.
OPTION_KEYS = ("momentum", "anneal", "noise", "maxstep")


class StepRuleError(AseBpttError, ValueError):
    """A step rule that does not exist, or an option it cannot take."""


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
        raise StepRuleError(f"momentum must be in [0, 1), got {momentum}; the paper used 0.05.")
    if not anneal > 0.0:
        raise StepRuleError(f"anneal must be positive, got {anneal}; use 1.0 for no annealing (the paper tried 0.99).")
    if not noise >= 0.0:
        raise StepRuleError(f"noise must be >= 0 (a standard deviation in A), got {noise}.")
    if maxstep is not None and not maxstep > 0.0:
        raise StepRuleError(f"maxstep must be positive (A) or None for no cap, got {maxstep}.")


class StepRule(nn.Module):
    """Base class of step rules.

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

    A new rule subclasses this, sets :attr:`name`, implements :meth:`step_size`
    (or overrides :meth:`forward`), :meth:`to_dict` and :meth:`from_dict`, and is
    decorated with :func:`~ase_bptt.relax.registry.register_step_rule`.

    Args:
        momentum: weight ``w`` of the previous direction, in ``[0, 1)``.
        anneal: multiplicative step annealing ``gamma`` (``eta_k = eta * gamma**k``).
        noise: standard deviation (A) of Gaussian noise added to each atom's
            update while the rule is in training mode.
        maxstep: largest displacement of any atom in one frame (A); None disables.
    """

    #: The registry key, stored as ``to_dict()["step"]`` in checkpoints.
    name: str = ""
    #: True when the update reads the structure (cell, species, positions), not only
    #: which atoms move: such a rule cannot run on the coordinates of an ASE filter.
    uses_structure: bool = False
    #: True when the rule stops like an ASE optimizer, by ``fmax`` and ``steps`` only,
    #: unless a ``tol`` is given explicitly (FIRE: its first steps are tiny, since its
    #: velocity starts at zero, so the displacement rule would stop it at once).
    stops_by_force: bool = False

    def __init__(
        self, *, momentum: float = 0.0, anneal: float = 1.0, noise: float = 0.0, maxstep: float | None = DEFAULT_MAXSTEP
    ) -> None:
        super().__init__()
        _check_options(momentum, anneal, noise, maxstep)
        self.momentum = float(momentum)
        self.anneal = float(anneal)
        self.noise = float(noise)
        self.maxstep = None if maxstep is None else float(maxstep)

    # ---------------------------------------------------------- construction
    @classmethod
    def from_options(
        cls,
        *,
        eta: float | None = None,
        maxstep: float | None = DEFAULT_MAXSTEP,
        momentum: float = 0.0,
        anneal: float = 1.0,
        noise: float = 0.0,
    ) -> StepRule:
        """The rule built from the CLI's and ``make_step_rule``'s options (``eta`` None: :data:`DEFAULT_ETA`)."""
        eta = DEFAULT_ETA if eta is None else eta
        build: Any = cls  # subclasses built this way take the step size first
        return build(eta, momentum=momentum, anneal=anneal, noise=noise, maxstep=maxstep)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepRule:
        """Inverse of :meth:`to_dict` (keys it does not know, such as ``tol``, are ignored)."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """JSON-like values and tensors only, with ``"step": self.name``, enough for :meth:`from_dict`."""
        raise NotImplementedError

    def stopping_tol(self, tol: float | None, saved_tol: float | None = None) -> float | None:
        """The displacement tolerance a relaxer applies: ``tol`` when given; else None for a rule that
        :attr:`stops_by_force`; else the checkpoint's ``saved_tol``, else :data:`DEFAULT_TOL`."""
        if tol is not None:
            return float(tol)
        if self.stops_by_force:
            return None
        return float(DEFAULT_TOL if saved_tol is None else saved_tol)

    @staticmethod
    def options_from_dict(d: dict[str, Any]) -> dict[str, Any]:
        """The shared options (momentum, anneal, noise, maxstep) present in a ``to_dict`` output."""
        return {k: d[k] for k in OPTION_KEYS if k in d}

    def _options(self) -> dict[str, Any]:
        return {"momentum": self.momentum, "anneal": self.anneal, "noise": self.noise, "maxstep": self.maxstep}

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
    ) -> float | torch.Tensor:
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

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self._options().items())
