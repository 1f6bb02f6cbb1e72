"""LearnedStepOptimizer: deploy a tuned model in any ASE workflow, relaxed exactly as it was trained.

    atoms.calc = BPTTCalculator("si.pt")
    LearnedStepOptimizer(atoms).run()          # the step rule saved in si.pt

It is an ordinary ``ase.optimize.Optimizer`` (NumPy, no autograd): it reads
the step rule from the calculator's ``relax_settings`` (the checkpoint's
``relax`` dict), applies the same update as
:class:`~ase_bptt.relax.relaxer.DifferentiableRelaxer` (step size, annealing,
momentum, the ``maxstep`` rescale) and stops by the same rule: after a step
whose RMS per-atom displacement is below ``tol``.

Fixed and learned scalar steps are computed in NumPy. A decoder step (a small
neural network) and FIRE are evaluated with the saved torch module under
``torch.no_grad`` in float64, on a Batch of one structure. Exploration noise
is a training device and is never applied here.

``fmax``: ASE's ``Optimizer.run`` defaults to ``fmax=0.05``; here ``run()``
and ``irun()`` default to ``fmax=None``, so only the displacement rule
decides, as in training. ``run(fmax=0.05)`` adds ASE's force criterion:
whichever is met first stops the run. ``steps`` defaults to the checkpoint's
``max_steps`` (the frames the model was tuned with), else 75.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import PropertyNotImplementedError
from ase.optimize.optimize import Dynamics, Optimizer

from ase_bptt.relax.defaults import DEFAULT_MAX_STEPS, DEFAULT_TOL
from ase_bptt.relax.steps import FixedStep, LearnedStep, rule_from_relax_settings

__all__ = ["LearnedStepOptimizer", "DEFAULT_MAX_FRAMES"]

DEFAULT_MAX_FRAMES = DEFAULT_MAX_STEPS  # kept for imports of the old name


class LearnedStepOptimizer(Optimizer):
    """An ASE optimizer that applies a checkpoint's step rule (or a fixed ``eta``).

    Args:
        atoms: the structure (its ``calc`` is normally a ``BPTTCalculator``).
        eta: a fixed step size (A^2/eV); overrides the checkpoint's rule (and its ``tol``
            and ``max_steps``), as in :class:`~ase_bptt.relax.relaxer.DifferentiableRelaxer`.
        tol: RMS per-atom displacement (A) below which the run has converged;
            None means the checkpoint's ``tol``, else 1e-3.
        maxstep: largest displacement of any atom per step (A) for a fixed
            ``eta``; None means the checkpoint rule's own (else 0.2).
        logfile: ``"-"`` for stdout (ASE's default), a path, or None.
        trajectory: an ASE trajectory path.
        **kwargs: passed to ``ase.optimize.Optimizer``.

    Raises:
        ValueError: no ``eta`` and the calculator carries no relax settings.
    """

    def __init__(
        self,
        atoms: Atoms,
        *,
        eta: float | None = None,
        tol: float | None = None,
        maxstep: float | None = None,
        logfile: Any = "-",
        trajectory: Any = None,
        **kwargs: Any,
    ) -> None:
        settings = getattr(getattr(atoms, "calc", None), "relax_settings", None)
        saved_tol = saved_steps = None
        if eta is not None:
            rule = FixedStep(eta, maxstep=0.2 if maxstep is None else maxstep)
        elif settings:
            rule, saved_tol, saved_steps = rule_from_relax_settings(settings)
            if maxstep is not None and rule.name != "fire":
                rule.maxstep = float(maxstep)
        else:
            raise ValueError(
                "LearnedStepOptimizer found no step rule: atoms.calc has no relax settings (use "
                "BPTTCalculator('tuned.pt'), whose checkpoint stores them) and no eta was given; "
                "pass eta=<step size in A^2/eV> to use a fixed step."
            )
        self.step_rule = rule.double().eval()
        self.tol = float(saved_tol if tol is None and saved_tol is not None else (DEFAULT_TOL if tol is None else tol))
        self.max_frames = int(saved_steps or DEFAULT_MAX_FRAMES)
        self.maxstep = self.step_rule.maxstep
        super().__init__(atoms, logfile=logfile, trajectory=trajectory, **kwargs)

    def initialize(self) -> None:
        self._frame = 0
        self._direction: np.ndarray | None = None
        self._state: dict | None = None
        self.last_rms: float | None = None

    def todict(self) -> dict[str, Any]:
        d = super().todict()
        d["step_rule"] = {k: v for k, v in self.step_rule.to_dict().items() if k != "state_dict"}
        d["tol"] = self.tol
        return d

    # ---------------------------------------------------------------- step
    def _numpy_update(self, forces: np.ndarray) -> np.ndarray:
        rule = self.step_rule
        if isinstance(rule, LearnedStep):
            eta = float(torch.exp(rule.log_eta.detach()))
        else:
            eta = rule.eta
        if rule.anneal != 1.0:
            eta = eta * rule.anneal**self._frame
        update = eta * forces
        if rule.momentum > 0.0:
            previous = np.zeros_like(update) if self._direction is None else self._direction
            update = (1.0 - rule.momentum) * update + rule.momentum * previous
            self._direction = update
        if rule.maxstep is not None:
            largest = np.linalg.norm(update, axis=1).max()
            update = update * (rule.maxstep / max(largest, rule.maxstep))
        return update

    def _torch_update(self, forces: np.ndarray) -> np.ndarray:
        from ase_bptt.batch import Batch

        atoms = self.optimizable.atoms if hasattr(self.optimizable, "atoms") else self.atoms
        if not isinstance(atoms, Atoms) or 3 * len(atoms) != forces.size:
            raise TypeError(
                f"a {self.step_rule.name!r} step works on plain Atoms, not {type(atoms).__name__}; "
                "use a fixed eta with filters."
            )
        # ASE has already applied the constraints to the forces (zero on fixed atoms).
        batch = Batch.from_atoms(atoms, constraints=False, dtype=torch.float64)
        f = torch.as_tensor(forces, dtype=torch.float64)[None]
        with torch.no_grad():
            if self._state is None:
                self._state = self.step_rule.init_state(batch, batch.positions)
            update, self._state = self.step_rule(batch.positions, f, batch, self._state, self._frame)
        return update[0].numpy()

    def step(self, f: np.ndarray | None = None) -> None:
        """One update: positions += the step rule applied to the (constrained) forces."""
        forces = -self._get_gradient(f).reshape(-1, 3)
        if isinstance(self.step_rule, (FixedStep, LearnedStep)):
            update = self._numpy_update(forces)
        else:
            update = self._torch_update(forces)
        x = self.optimizable.get_x()
        self.optimizable.set_x(x + update.ravel())
        moved = (self.optimizable.get_x() - x).reshape(-1, 3)
        self.last_rms = float(np.sqrt((moved * moved).sum() / len(moved)))
        self._frame += 1

    # ---------------------------------------------------------- convergence
    def gradient_converged(self, gradient: np.ndarray) -> bool:
        """The last step moved atoms by less than ``tol`` (RMS), or max force < ``fmax`` when given."""
        if self.fmax is not None and self.optimizable.converged(gradient, self.fmax):
            return True
        return self.last_rms is not None and self.last_rms < self.tol

    def irun(self, fmax: float | None = None, steps: int | None = None):
        """As ASE's ``irun``, but ``fmax`` defaults to None (displacement rule only), ``steps`` to ``max_frames``."""
        self.fmax = fmax
        return Dynamics.irun(self, steps=self.max_frames if steps is None else steps)

    def run(self, fmax: float | None = None, steps: int | None = None) -> bool:
        """As ASE's ``run``, but ``fmax`` defaults to None (displacement rule only), ``steps`` to ``max_frames``."""
        self.fmax = fmax
        return Dynamics.run(self, steps=self.max_frames if steps is None else steps)

    def log(self, gradient: np.ndarray) -> None:
        """ASE's log line; the energy column reads nan for a forces-only model."""
        fmax = self.optimizable.gradient_norm(gradient)
        try:
            e = self.optimizable.get_value()
        except PropertyNotImplementedError:
            e = float("nan")
        t = time.localtime()
        name = self.__class__.__name__
        if self.nsteps == 0:
            self.logfile.write("%s  %4s %8s %15s  %12s\n" % (" " * len(name), "Step", "Time", "Energy", "fmax"))
        self.logfile.write("%s:  %3d %02d:%02d:%02d %15.6f %15.6f\n" % (name, self.nsteps, t[3], t[4], t[5], e, fmax))
