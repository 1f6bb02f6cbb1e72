"""LearnedStepOptimizer: deploy a tuned model in any ASE workflow, relaxed exactly as it was trained.

    atoms.calc = BPTTCalculator("si.pt")
    LearnedStepOptimizer(atoms).run()          # the step rule saved in si.pt

It is an ordinary ``ase.optimize.Optimizer``: it reads the step rule from the
calculator's ``relax_settings`` (the checkpoint's ``relax`` dict) and applies
that very torch rule (the one :class:`~ase_bptt.relax.relaxer.DifferentiableRelaxer`
and training use) under ``torch.no_grad`` in float64, with NumPy arrays at its
edges. Exploration noise is a training device and is never applied here.
Fixed, learned and FIRE steps also run on ASE filters (their coordinates
include the cell); a decoder step needs plain Atoms.

What stops it: for fixed, learned and decoder steps, a step whose RMS
per-atom displacement is below ``tol`` (as in training); ``run()`` and
``irun()`` default to ``fmax=None`` (ASE's are 0.05), so only the
displacement rule decides, and ``run(fmax=0.05)`` adds ASE's force criterion
(whichever is met first). A FIRE step stops as ``ase.optimize.FIRE``: by
``fmax`` (default 0.05 eV/A) or ``steps``, by ``tol`` only when one is passed
explicitly. ``steps`` defaults to the checkpoint's ``max_steps`` (the frames
the model was tuned with), else 75.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import PropertyNotImplementedError
from ase.optimize.optimize import Dynamics, Optimizer

from ase_bptt.batch import Batch
from ase_bptt.relax.base import StepRule
from ase_bptt.relax.defaults import DEFAULT_FMAX, DEFAULT_MAX_STEPS, DEFAULT_MAXSTEP
from ase_bptt.relax.registry import rule_from_relax_settings
from ase_bptt.relax.steps import FixedStep

__all__ = ["LearnedStepOptimizer", "DEFAULT_MAX_FRAMES"]

DEFAULT_MAX_FRAMES = DEFAULT_MAX_STEPS  # kept for imports of the old name


class LearnedStepOptimizer(Optimizer):
    """An ASE optimizer that applies a checkpoint's step rule (or a fixed ``eta``).

    Args:
        atoms: the structure (its ``calc`` is normally a ``BPTTCalculator``).
        eta: a fixed step size (A^2/eV); overrides the checkpoint's rule (and its ``tol``
            and ``max_steps``), as in :class:`~ase_bptt.relax.relaxer.DifferentiableRelaxer`.
        tol: RMS per-atom displacement (A) below which the run has converged;
            None means the checkpoint's ``tol``, else 1e-3 (FIRE: no displacement rule).
        maxstep: largest displacement of any atom per step (A) for a fixed
            ``eta``; None means the checkpoint rule's own (else 0.2).
        logfile: ``"-"`` for stdout (ASE's default), a path, or None.
        trajectory: an ASE trajectory path.
        **kwargs: passed to ``ase.optimize.Optimizer``.

    Raises:
        ValueError: no ``eta`` and the calculator carries no relax settings.
    """

    fmax: float | None  # type: ignore[assignment]  # ASE types it None; run() sets the force criterion

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
        rule: StepRule
        if eta is not None:
            rule = FixedStep(eta, maxstep=DEFAULT_MAXSTEP if maxstep is None else maxstep)
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
        #: displacement tolerance (A), or None where only ``fmax`` and ``steps`` stop the run (FIRE).
        self.tol = rule.stopping_tol(tol, saved_tol)
        self.max_frames = int(saved_steps or DEFAULT_MAX_FRAMES)
        self.maxstep = self.step_rule.maxstep
        super().__init__(atoms, logfile=logfile, trajectory=trajectory, **kwargs)

    def initialize(self) -> None:
        self._frame = 0
        self._state: dict[str, torch.Tensor] | None = None
        self._points: Batch | None = None
        self.last_rms: float | None = None

    def todict(self) -> dict[str, Any]:
        d = super().todict()
        d["step_rule"] = {k: v for k, v in self.step_rule.to_dict().items() if k != "state_dict"}
        d["tol"] = self.tol
        return d

    # ---------------------------------------------------------------- step
    def _rule_batch(self, x: np.ndarray) -> Batch:
        """What the torch rule sees: the structure itself, or plain points for rules that need no structure.

        Fixed, learned and FIRE steps read only which rows move, so they also
        work on the coordinates of ASE filters (atoms plus cell degrees of
        freedom); a rule with ``uses_structure`` (the decoder) needs plain Atoms.
        """
        n = x.size // 3
        if self.step_rule.uses_structure:
            atoms = self.optimizable.atoms if hasattr(self.optimizable, "atoms") else self.atoms
            if not isinstance(atoms, Atoms) or len(atoms) != n:
                raise TypeError(
                    f"a {self.step_rule.name!r} step works on plain Atoms, not {type(atoms).__name__}; "
                    "use a fixed eta with filters."
                )
            # ASE has already applied the constraints to the forces (zero on fixed atoms).
            return Batch.from_atoms(atoms, constraints=False, dtype=torch.float64)
        if self._points is None or self._points.positions.shape[1] != n:
            real = torch.ones((1, n), dtype=torch.bool)
            self._points = Batch(
                positions=torch.zeros((1, n, 3), dtype=torch.float64),
                numbers=torch.zeros((1, n), dtype=torch.long),
                masses=torch.ones((1, n), dtype=torch.float64),
                mask=real,
                fixed=~real,
                cell=torch.zeros((1, 3, 3), dtype=torch.float64),
                pbc=torch.zeros((1, 3), dtype=torch.bool),
            )
        return self._points

    def step(self, f: np.ndarray | None = None) -> None:
        """One update: positions += the torch step rule applied to the (constrained) forces, in float64."""
        forces = -self._get_gradient(f).reshape(1, -1, 3)
        x = self.optimizable.get_x()
        batch = self._rule_batch(x)
        positions = torch.from_numpy(x.reshape(1, -1, 3))
        with torch.no_grad():
            if self._state is None:
                self._state = self.step_rule.init_state(batch, positions)
            update, self._state = self.step_rule(positions, torch.from_numpy(forces), batch, self._state, self._frame)
        self.optimizable.set_x(x + update.numpy().ravel())
        moved = (self.optimizable.get_x() - x).reshape(-1, 3)
        self.last_rms = float(np.sqrt((moved * moved).sum() / len(moved)))
        self._frame += 1

    # ---------------------------------------------------------- convergence
    def gradient_converged(self, gradient: np.ndarray) -> bool:
        """The last step moved atoms by less than ``tol`` (RMS), or max force < ``fmax`` when given."""
        if self.fmax is not None and self.optimizable.converged(gradient, self.fmax):
            return True
        return self.tol is not None and self.last_rms is not None and self.last_rms < self.tol

    def _default_fmax(self, fmax: float | None) -> float | None:
        return DEFAULT_FMAX if fmax is None and self.tol is None else fmax

    def irun(self, fmax: float | None = None, steps: int | None = None):  # type: ignore[override]
        """As ASE's ``irun``; ``fmax`` None: none (0.05 where no ``tol`` applies), ``steps`` to ``max_frames``."""
        self.fmax = self._default_fmax(fmax)
        return Dynamics.irun(self, steps=self.max_frames if steps is None else steps)

    def run(self, fmax: float | None = None, steps: int | None = None) -> bool:  # type: ignore[override]
        """As ASE's ``run``; ``fmax`` None: none (0.05 where no ``tol`` applies), ``steps`` to ``max_frames``."""
        self.fmax = self._default_fmax(fmax)
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
