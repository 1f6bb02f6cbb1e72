"""Differentiable FIRE: ``ase.optimize.FIRE``, batched and written out of place.

Reproduces ASE 3.29's FIRE (``downhill_check=False``, the default) step for
step, independently for every structure in a batch:

* first step: ``v = 0`` (ASE's ``vel is None``), no change to ``dt``, ``a``;
* later steps, with ``P = F . v`` over the whole structure:
  ``P > 0``: ``v <- (1 - a) v + a |v| F / |F|``; if ``Nsteps > Nmin`` then
  ``dt <- min(dt * finc, dtmax)`` and ``a <- a * fa``; ``Nsteps += 1``.
  Otherwise ``v <- 0``, ``a <- astart``, ``dt <- dt * fdec``, ``Nsteps <- 0``;
* ``v <- v + dt F``; ``dr = dt v``; if ``|dr| > maxstep`` (the norm of the
  whole structure's ``dr``, as ASE does) ``dr <- maxstep dr / |dr|``.

Forces on fixed atoms are zero (ASE's ``FixAtoms`` does the same), so they
never gain velocity. The algorithm is piecewise differentiable: branch
choices are taken on values (never differentiated) and every norm is
epsilon-safe, so a zero velocity or a zero force gives finite gradients.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ase_bptt.batch import Batch
from ase_bptt.relax.base import State, StepRule, StepRuleError, safe_norm
from ase_bptt.relax.defaults import DEFAULT_MAXSTEP
from ase_bptt.relax.registry import register_step_rule

__all__ = ["FIREStep"]


_FIRE_KEYS = ("dt", "maxstep", "dtmax", "Nmin", "finc", "fdec", "astart", "fa", "a", "noise")


@register_step_rule
class FIREStep(StepRule):
    """ASE's FIRE as a step rule, with ASE's defaults.

    Args:
        dt: initial time step.
        maxstep: largest norm of one structure's whole update (A), as in ASE.
        dtmax: largest time step.
        Nmin: steps after an uphill reset before ``dt`` may grow.
        finc: ``dt`` growth factor.
        fdec: ``dt`` decrease factor on an uphill step.
        astart: mixing coefficient after a reset.
        fa: ``a`` decay factor.
        a: initial mixing coefficient.
        noise: exploration noise (A) added to ``dr`` in training mode.
    """

    name = "fire"
    stops_by_force = True

    def __init__(
        self,
        *,
        dt: float = 0.1,
        maxstep: float = DEFAULT_MAXSTEP,
        dtmax: float = 1.0,
        Nmin: int = 5,
        finc: float = 1.1,
        fdec: float = 0.5,
        astart: float = 0.1,
        fa: float = 0.99,
        a: float = 0.1,
        noise: float = 0.0,
    ) -> None:
        if maxstep is None:
            raise StepRuleError("FIRE needs a finite maxstep (ASE's default is 0.2 A).")
        super().__init__(momentum=0.0, anneal=1.0, noise=noise, maxstep=maxstep)
        self.maxstep: float = float(maxstep)
        self.dt = float(dt)
        self.dtmax = float(dtmax)
        self.Nmin = int(Nmin)
        self.finc = float(finc)
        self.fdec = float(fdec)
        self.astart = float(astart)
        self.fa = float(fa)
        self.a = float(a)

    def init_state(self, batch: Batch, positions: torch.Tensor, forces: torch.Tensor | None = None) -> State:
        b = positions.shape[0]
        dtype, device = positions.dtype, positions.device
        return {
            "velocity": torch.zeros_like(positions),
            "dt": torch.full((b,), self.dt, dtype=dtype, device=device),
            "a": torch.full((b,), self.a, dtype=dtype, device=device),
            "nsteps": torch.zeros(b, dtype=torch.long, device=positions.device),
            "started": torch.zeros(b, dtype=torch.bool, device=positions.device),
        }

    def forward(
        self, positions: Tensor, forces: Tensor, batch: Batch, state: State, frame: int, noise: Tensor | None = None
    ) -> tuple[Tensor, State]:
        movable = batch.movable[..., None]
        g = torch.where(movable, forces, torch.zeros_like(forces))
        v, dt, a, n, started = state["velocity"], state["dt"], state["a"], state["nsteps"], state["started"]

        vf = (g * v).sum(dim=(1, 2))
        gnorm = safe_norm(g, dim=(1, 2))
        vnorm = safe_norm(v, dim=(1, 2))
        downhill = started & (vf > 0.0)
        reset = started & ~downhill
        grow = downhill & (n > self.Nmin)

        safe_gnorm = torch.where(gnorm > 0, gnorm, torch.ones_like(gnorm))
        col = (slice(None), None, None)
        mixed = (1.0 - a)[col] * v + a[col] * g / safe_gnorm[col] * vnorm[col]
        v = torch.where(downhill[col], mixed, torch.where(reset[col], torch.zeros_like(v), v))
        dt = torch.where(grow, torch.clamp(dt * self.finc, max=self.dtmax), torch.where(reset, dt * self.fdec, dt))
        a = torch.where(grow, a * self.fa, torch.where(reset, torch.full_like(a, self.astart), a))
        n = torch.where(downhill, n + 1, torch.where(reset, torch.zeros_like(n), n))

        v = v + dt[col] * g
        dr = dt[col] * v
        if noise is not None and self.wants_noise:
            dr = dr + self.noise * noise
        dr = torch.where(movable, dr, torch.zeros_like(dr))
        normdr = safe_norm(dr, dim=(1, 2))
        dr = dr * (self.maxstep / torch.clamp(normdr, min=self.maxstep))[col]
        new_state = {"velocity": v, "dt": dt, "a": a, "nsteps": n, "started": torch.ones_like(started)}
        return dr, new_state

    def _fire_options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _FIRE_KEYS}

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.name, **self._fire_options()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FIREStep:
        """Inverse of :meth:`to_dict` (unknown keys such as ``tol`` are ignored)."""
        return cls(**{k: d[k] for k in _FIRE_KEYS if k in d})

    @classmethod
    def from_options(cls, **options: Any) -> FIREStep:
        """ASE's FIRE with ``maxstep`` (None: 0.2 A) and ``noise``; it takes no eta, momentum or annealing.

        Takes :meth:`StepRule.from_options`'s keywords (``eta``, ``maxstep``,
        ``momentum``, ``anneal``, ``noise``) and refuses those FIRE has no use for.
        """
        unknown = set(options) - {"eta", "maxstep", "momentum", "anneal", "noise"}
        if unknown:
            raise StepRuleError(f"unknown step-rule options {sorted(unknown)}; FIRE takes maxstep and noise.")
        if options.get("eta") is not None:
            raise StepRuleError("FIRE takes no eta (it adapts its own time step); build FIREStep(dt=...) to change it.")
        if options.get("momentum", 0.0) != 0.0 or options.get("anneal", 1.0) != 1.0:
            raise StepRuleError(
                "FIRE has its own velocity mixing; momentum and anneal apply only to "
                "'fixed', 'learned' and 'decoder' steps."
            )
        maxstep = options.get("maxstep", DEFAULT_MAXSTEP)
        return cls(maxstep=DEFAULT_MAXSTEP if maxstep is None else maxstep, noise=options.get("noise", 0.0))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self._fire_options().items())
