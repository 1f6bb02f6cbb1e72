"""Silicon point-defect relaxations with a classical reference, written into a TrajectoryDB.

This is the data of ``studies/reproduce_paper.py``, and a template for
putting relaxations from any ASE calculator of your own into a
:class:`~ase_bptt.data.db.TrajectoryDB`: build the starting structure, relax
it with an ASE optimizer, keep every frame with its energy and forces, and
call :meth:`~ase_bptt.data.db.TrajectoryDB.add_trajectory`.

The reference is the Stillinger-Weber potential for silicon (matscipy), the
optimizer ASE's FIRE (fmax 0.01 eV/A). The cells are diamond silicon
supercells of ``repeat**3`` conventional cells (64 sites for ``repeat=2``,
216 for 3) holding one point defect:

* ``vacancy``: the lattice atom nearest the cell centre removed;
* ``tetrahedral``: an extra atom on a tetrahedral interstitial site
  (``(1/2, 1/2, 1/2) a`` from a lattice site);
* ``hexagonal``: an extra atom on a hexagonal interstitial site
  (``(5/8, 5/8, 5/8) a``); under Stillinger-Weber this site is unstable and
  the atom falls into one of several nearby minima, decided by the rattle.

Every atom is then rattled (Gaussian, ``rattle`` A per component).

Where the defect sits (``site``): ``"fixed"`` puts it at the same site of the
supercell in every structure, as defect datasets computed with DFT do (one
supercell, the defect at one site, several starting distortions); so the
relaxed structures of one defect type are nearly the same target every time.
``"random"`` translates each structure by a random lattice vector of the
diamond lattice, so the defect sits at a random site.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from ase.optimize import FIRE

__all__ = ["KINDS", "stillinger_weber", "defect_cell", "relax_reference", "add_si_defects"]

KINDS = ("vacancy", "tetrahedral", "hexagonal", "split110", "divacancy")
LATTICE = 5.431  # A, the Stillinger-Weber lattice constant of diamond silicon
_FCC = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])


def stillinger_weber():
    """The Stillinger-Weber silicon calculator of matscipy (PRB 31, 5262)."""
    from matscipy.calculators.manybody import Manybody
    from matscipy.calculators.manybody.explicit_forms import StillingerWeber
    from matscipy.calculators.manybody.explicit_forms.stillinger_weber import Stillinger_Weber_PRB_31_5262_Si

    return Manybody(**StillingerWeber(Stillinger_Weber_PRB_31_5262_Si))


def defect_cell(
    kind: str, rng: np.random.Generator, *, repeat: int = 2, rattle: float = 0.1, site: str = "fixed"
) -> Atoms:
    """A rattled diamond-silicon supercell holding one point defect.

    Args:
        kind: one of :data:`KINDS`.
        rng: random generator (rattle and, for ``site="random"``, the translation).
        repeat: conventional cells per side (2: 64 sites, 3: 216 sites).
        rattle: standard deviation of the Gaussian rattle (A per component).
        site: ``"fixed"`` (same site every time) or ``"random"``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {KINDS}")
    if site not in ("fixed", "random"):
        raise ValueError(f"site must be 'fixed' or 'random', not {site!r}")
    a = LATTICE
    atoms = bulk("Si", "diamond", a=a, cubic=True).repeat((repeat,) * 3)
    centre = np.full(3, (repeat // 2) * a)
    site_index = int(np.argmin(np.linalg.norm(atoms.positions - centre - 0.25 * a, axis=1)))
    if kind == "vacancy":
        del atoms[site_index]
    elif kind == "divacancy":
        d = atoms.get_distances(site_index, range(len(atoms)), mic=True)
        d[site_index] = np.inf
        del atoms[[site_index, int(np.argmin(d))]]
    elif kind == "split110":
        # Two atoms share one lattice site along [110], 2.3 A apart.
        u = np.array([1.0, 1.0, 0.0]) / np.sqrt(2.0)
        lattice_site = atoms.positions[site_index].copy()
        atoms.positions[site_index] = lattice_site - 1.15 * u
        atoms += Atoms("Si", positions=[lattice_site + 1.15 * u])
    elif kind == "tetrahedral":
        atoms += Atoms("Si", positions=[centre + 0.5 * a])
    else:
        atoms += Atoms("Si", positions=[centre + 0.625 * a])
    if site == "random":
        shift = rng.integers(0, repeat, size=3) * a + _FCC[rng.integers(4)] * a
        atoms.positions += shift
    atoms.positions += rng.normal(scale=rattle, size=atoms.positions.shape)
    atoms.wrap()
    return atoms


def relax_reference(atoms: Atoms, calc, *, fmax: float = 0.01, steps: int = 1000) -> list[Atoms]:
    """Relax ``atoms`` with ASE FIRE and ``calc``; every frame with its energy and forces."""
    atoms = atoms.copy()
    atoms.calc = calc
    frames: list[Atoms] = []

    def record() -> None:
        frame = atoms.copy()
        frame.calc = SinglePointCalculator(frame, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
        frames.append(frame)

    opt = FIRE(atoms, logfile=None)
    opt.attach(record)
    opt.run(fmax=fmax, steps=steps)
    return frames


def _relax_one(args: tuple) -> tuple[str, list[Atoms]]:
    kind, seed, repeat, rattle, site = args
    rng = np.random.default_rng(seed)
    return kind, relax_reference(defect_cell(kind, rng, repeat=repeat, rattle=rattle, site=site), stillinger_weber())


def add_si_defects(
    db,
    counts: dict[str, int],
    *,
    seed: int = 0,
    repeat: int = 2,
    rattle: float = 0.1,
    site: str = "fixed",
    kinds: Sequence[str] = KINDS,
    workers: int = 1,
    echo=print,
) -> dict[str, int]:
    """Generate relaxations and store them with an explicit split.

    Args:
        db: a :class:`~ase_bptt.data.db.TrajectoryDB`.
        counts: trajectories per split, e.g. ``{"train": 30, "val": 20, "test": 40}``;
            defect kinds cycle within each split, so every split holds all kinds.
        seed: base seed; structure ``i`` of split ``s`` uses a seed derived from
            ``(seed, s, i)``, so a split's structures do not depend on the other counts.
        repeat, rattle, site: see :func:`defect_cell`.
        kinds: defect kinds to cycle through.
        workers: processes relaxing in parallel.
        echo: progress printer.

    Returns:
        The number of trajectories written per split.
    """
    jobs = []
    for s_index, split in enumerate(("train", "val", "test")):
        for i in range(counts.get(split, 0)):
            kind = kinds[i % len(kinds)]
            jobs.append((split, (kind, [seed, s_index, i], repeat, rattle, site)))
    t0 = time.perf_counter()
    if workers > 1:
        from multiprocessing import get_context

        with get_context("spawn").Pool(workers) as pool:
            results = pool.map(_relax_one, [j[1] for j in jobs], chunksize=1)
    else:
        results = [_relax_one(j[1]) for j in jobs]
    written: dict[str, int] = {}
    with db.transaction():
        for (split, job), (kind, frames) in zip(jobs, results):
            seeds = "-".join(str(s) for s in job[1])
            db.add_trajectory(
                frames,
                traj_id=f"si-{kind}-{site}-r{repeat}-{seeds}",
                label=kind,
                source=f"Stillinger-Weber FIRE fmax 0.01, rattle {rattle}, site {site}",
                split=split,
            )
            written[split] = written.get(split, 0) + 1
    echo(f"    {len(jobs)} reference relaxations in {time.perf_counter() - t0:.0f} s")
    return written
