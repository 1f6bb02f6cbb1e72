"""Relaxation defaults, defined once (every module, the CLI and the docs read them from here).

The paper's values for silicon point defects: a rollout stops after a frame
whose RMS per-atom displacement is below ``DEFAULT_TOL`` or after
``DEFAULT_MAX_STEPS`` frames; no atom moves more than ``DEFAULT_MAXSTEP`` in
one frame.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_ETA",
    "DEFAULT_TOL",
    "DEFAULT_MAX_STEPS",
    "DEFAULT_MAXSTEP",
    "DEFAULT_FMAX",
    "DEFAULT_ETA_GRID",
    "REFINE_OPTIMIZERS",
]

#: Step size (A^2/eV) used when none is given and the model carries no relax settings.
DEFAULT_ETA = 0.05
#: RMS per-atom displacement of one frame (A) below which a rollout has converged.
DEFAULT_TOL = 1e-3
#: Most frames per rollout (the paper's limit for Si defects).
DEFAULT_MAX_STEPS = 75
#: Largest displacement of any atom in one frame (A); ASE's FIRE default too.
DEFAULT_MAXSTEP = 0.2
#: Force criterion (eV/A) of a rule that stops by force (FIRE) when ``run`` is given none: ASE's default.
DEFAULT_FMAX = 0.05
#: Fixed step sizes (A^2/eV) scanned on val to choose the best fixed step, in
#: fine-tuning (the initial eta) and in evaluation (the baseline row):
#: ``geomspace(0.005, 0.3, 10)`` to 3 digits, the paper's Table 6 range and
#: beyond it, up to where the 0.2 A per-frame cap dominates.
DEFAULT_ETA_GRID: tuple[float, ...] = (0.005, 0.00788, 0.0124, 0.0196, 0.0309, 0.0486, 0.0766, 0.121, 0.19, 0.3)
#: The grid for universal MLIPs (the ``universal`` recipe's grid search and ``evaluate``'s default when a
#: checkpoint holds one): every other step of :data:`DEFAULT_ETA_GRID` up to 0.121, since a CHGNet fixed-step
#: relaxation costs ~25x ADAPT-MI's (a 75-frame curve point of 11 structures: 60 s on one core) and on silicon
#: defects CHGNet's train Dq was 6.07 at 0.121 and 6.05 at 0.3 against 3.99 at 0.0196.
UNIVERSAL_ETA_GRID: tuple[float, ...] = DEFAULT_ETA_GRID[1:9:2]
#: Step limit of an ASE FIRE relaxation: the baseline rows of ``evaluate`` and ``relax --optimizer fire``.
DEFAULT_FIRE_STEPS = 300
#: Structures per batched no-grad relaxation in ``evaluate``.
EVAL_BATCH_SIZE = 16
#: Step limit of the reference refinement of ``evaluate --refine-with`` (a DFT code's ionic-step budget).
REFINE_STEPS = 1000
#: The ase.optimize classes ``evaluate --refine-optimizer`` accepts for the reference refinement.
REFINE_OPTIMIZERS = ("FIRE", "BFGS", "LBFGS", "BFGSLineSearch", "LBFGSLineSearch", "GPMin", "MDMin")
