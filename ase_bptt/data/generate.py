"""Generate relaxation trajectories with a reference calculator.

``generate("si-defects", db, n=300, workers=2)`` builds ``n`` structures with
a recipe (:mod:`ase_bptt.data.recipes`), relaxes each with ASE's FIRE and the
reference calculator to ``fmax`` (default 0.01 eV/A, at most ``max_steps``
steps) and stores every frame. Trajectory ``i`` is built from the random
generator seeded with ``(seed, i)`` and stored as ``<recipe>-s<seed>-<i:05d>``
(e.g. ``si-defects-s0-00042``), so a run is deterministic and resumable: a
rerun makes only the indices that are not in the database yet. Each
trajectory is written in its own transaction (with its split, when
``splits`` is given) as soon as it is done, so a run killed after k
trajectories keeps k, each with its split. Trajectories that hit ``max_steps`` are
stored too; the database marks them unconverged when their last frame's max
force is above its ``converged_fmax``. The settings of each (recipe, seed) are
recorded in the database metadata under ``generated``; resuming with other
settings is an error.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from itertools import islice
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import BaseCalculator
from ase.calculators.singlepoint import SinglePointCalculator
from ase.optimize import FIRE

from ase_bptt.data.db import TrajectoryDB
from ase_bptt.data.recipes import RECIPES, Recipe, RecipeOptionError, resolve_reference
from ase_bptt.data.splits import SplitFractions, hold_out_in_force, target_splits

__all__ = ["generate", "relax_frames", "make_trajectory", "traj_id_for"]


def traj_id_for(recipe: str, seed: int, index: int) -> str:
    """The traj_id of trajectory ``index`` of a recipe run with ``seed``."""
    return f"{recipe}-s{seed}-{index:05d}"


def relax_frames(atoms: Atoms, calc: BaseCalculator, *, fmax: float = 0.01, max_steps: int = 1000) -> list[Atoms]:
    """Relax positions with ASE's FIRE and return every frame.

    The cell is fixed. Each frame carries a ``SinglePointCalculator`` with
    the reference energy and forces; frame 0 is the input structure.
    """
    atoms = atoms.copy()
    atoms.calc = calc
    frames: list[Atoms] = []

    def snapshot() -> None:
        frame = atoms.copy()
        frame.calc = SinglePointCalculator(
            frame,
            energy=float(atoms.get_potential_energy()),
            forces=atoms.get_forces(apply_constraint=False).copy(),
        )
        frames.append(frame)

    opt = FIRE(atoms, logfile=None)
    # ASE calls observers once before the first step and after every step.
    opt.attach(snapshot, interval=1)
    opt.run(fmax=fmax, steps=max_steps)
    return frames


def make_trajectory(
    recipe: Recipe,
    index: int,
    *,
    seed: int,
    reference: Any,
    factory: Callable[[], BaseCalculator],
    options: dict,
) -> tuple[list[Atoms], str]:
    """Build and relax trajectory ``index``: ``(frames, label)``."""
    rng = np.random.default_rng([seed, index])
    atoms, label = recipe.build(rng, reference, **options)
    frames = relax_frames(atoms, factory(), fmax=options["fmax"], max_steps=options["max_steps"])
    return frames, label


# Worker state, set once per process by the pool initializer.
_WORKER: dict = {}


def _init_worker(recipe_name: str, seed: int, reference: Any, options: dict) -> None:
    factory, _ = resolve_reference(reference)
    calc = factory()  # one calculator per process, reused for every trajectory
    _WORKER.update(recipe=RECIPES[recipe_name], seed=seed, reference=reference, calc=calc, options=options)


def _work(index: int) -> tuple[int, list[Atoms], str]:
    w = _WORKER
    frames, label = make_trajectory(
        w["recipe"], index, seed=w["seed"], reference=w["reference"], factory=lambda: w["calc"], options=w["options"]
    )
    return index, frames, label


def _check_same_settings(db: TrajectoryDB, recipe: str, seed: int, ref_name: str, opts: dict) -> None:
    # A resumed run must continue with the settings it started with, or the
    # trajectories of one (recipe, seed) would silently mix two datasets.
    settings = json.loads(json.dumps({"reference": ref_name, "options": opts}))
    key = f"{recipe}-s{seed}"
    recorded = db.metadata.get("generated", {})
    if key in recorded and recorded[key] != settings:
        raise ValueError(
            f"{db.name} already holds {key} trajectories made with {recorded[key]}; "
            f"this run asks for {settings}. Use another seed, or the same settings to resume"
        )
    if key not in recorded:
        db.update_metadata(generated={**recorded, key: settings})


def generate(
    recipe: str,
    db: TrajectoryDB,
    *,
    n: int,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    reference: Any = None,
    splits: SplitFractions | None = None,
    **options: Any,
) -> int:
    """Make ``n`` relaxation trajectories with a built-in recipe.

    Args:
        recipe: ``"si-defects"`` or ``"alloys"`` (see
            :mod:`ase_bptt.data.recipes` for their options).
        db: where the trajectories go.
        n: number of trajectories wanted (indices ``0 .. n-1``).
        seed: trajectory ``i`` uses the random generator seeded with
            ``(seed, i)``.
        workers: processes relaxing in parallel (the parent writes).
        progress: show a progress bar on stderr.
        reference: the reference calculator: a built-in name (``"sw"``,
            ``"tersoff"``, ``"emt"``), ``"module:Class"``, a Calculator or a
            callable returning one; default the recipe's (SW for
            ``si-defects``, EMT for ``alloys``).
        splits: give each new trajectory its split as it is written, and
            the database's others at the end (see
            :meth:`TrajectoryDB.assign_splits`); None leaves splits alone.
        **options: recipe options, e.g. ``size=3``, ``sigma=0.05``,
            ``fmax``, ``max_steps``.

    Returns:
        The number of trajectories added by this call (0 when all ``n`` are
        already in the database).

    Raises:
        ValueError: unknown recipe or recipe option.
        MissingDependencyError: the reference needs matscipy and it is not
            installed.
        DatabaseAccessError: the database cannot be written (checked first).
        HoldOutError: ``splits.hold_out`` cannot be kept (checked on the
            unrelaxed structures, before anything is written).
    """
    from tqdm.auto import tqdm

    if recipe not in RECIPES:
        raise RecipeOptionError(f"unknown recipe {recipe!r}; choose from {sorted(RECIPES)}")
    rec = RECIPES[recipe]
    opts = rec.options(options)
    if reference is None:
        reference = rec.default_reference
    factory, ref_name = resolve_reference(reference)
    # Build one structure now so bad options fail before any work starts.
    try:
        rec.build(np.random.default_rng([seed, 0]), reference, **opts)
    except ValueError as exc:  # the recipe's own check of an option value
        raise RecipeOptionError(f"recipe {recipe!r}, --option: {exc}") from None
    db.check_writable()

    existing = db.traj_ids()

    def missing() -> Iterator[int]:
        # Lazily: n may be huge (a typo, or "as many as time allows"); memory stays bounded.
        return (i for i in range(n) if traj_id_for(recipe, seed, i) not in existing)

    stored = sum(1 for t in existing if (k := _index_of(t, recipe, seed)) is not None and k < n)
    if splits is not None:  # a hold-out recorded in db stays in force (TrajectoryDB.assign_splits)
        splits = replace(splits, hold_out=hold_out_in_force(db.metadata, splits.hold_out, reassign=False))
        if splits.hold_out:
            _check_hold_out(db, rec, seed, reference, opts, missing(), splits)
    _check_same_settings(db, recipe, seed, ref_name, opts)
    source = f"generate:{recipe}:{ref_name}"
    added = 0
    bar = tqdm(total=n - stored, desc=recipe, unit="traj", file=sys.stderr, disable=not progress)

    def store(index: int, frames: list[Atoms], label: str) -> None:
        nonlocal added
        traj_id = traj_id_for(recipe, seed, index)
        split = None if splits is None else splits.split_of(traj_id, label, frames[0].get_chemical_symbols())
        db.add_trajectory(frames, traj_id=traj_id, label=label, source=source, split=split)
        added += 1
        bar.update(1)

    try:
        if workers <= 1 or n - stored <= 1:
            calc = factory()
            for i in missing():
                frames, label = make_trajectory(
                    rec, i, seed=seed, reference=reference, factory=lambda: calc, options=opts
                )
                store(i, frames, label)
        else:
            # fork shares the reference object with the workers; spawn (other
            # platforms) needs it picklable.
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            ctx = mp.get_context(method)
            with ctx.Pool(workers, initializer=_init_worker, initargs=(recipe, seed, reference, opts)) as pool:
                for i, frames, label in _in_window(pool, missing(), 4 * workers):
                    store(i, frames, label)
    finally:
        bar.close()
    if splits is not None:
        db.assign_splits(val=splits.val, test=splits.test, seed=splits.seed, hold_out=splits.hold_out)
    return added


def _index_of(traj_id: str, recipe: str, seed: int) -> int | None:
    """The index of a trajectory :func:`traj_id_for` named, or None for another recipe or seed."""
    head, _, index = traj_id.rpartition("-")
    return int(index) if head == f"{recipe}-s{seed}" and index.isdigit() else None


def _in_window(pool: Any, indices: Iterator[int], window: int) -> Iterator[tuple[int, list[Atoms], str]]:
    """``_work(i)`` for every index, at most ``window`` queued at once, in index order.

    ``Pool.imap_unordered`` would queue every index up front (memory grows
    with ``n``); the order makes the database's row order independent of timing.
    """
    pending: deque = deque(pool.apply_async(_work, (i,)) for i in islice(indices, window))
    while pending:
        yield pending.popleft().get()
        for i in islice(indices, 1):
            pending.append(pool.apply_async(_work, (i,)))


def _check_hold_out(
    db: TrajectoryDB, rec: Recipe, seed: int, reference: Any, opts: dict, missing: Iterable[int], splits: SplitFractions
) -> None:
    # Before anything is written: the unrelaxed structures already have their
    # labels and elements (building them is cheap; relaxing is not).
    info = db.split_info()
    for i in missing:
        atoms, label = rec.build(np.random.default_rng([seed, i]), reference, **opts)
        info[traj_id_for(rec.name, seed, i)] = (label, None, frozenset(atoms.get_chemical_symbols()))
    target_splits(info, splits.val, splits.test, splits.seed, reassign=False, hold_out=splits.hold_out)
