"""Generators: recipes, determinism, resumability, references."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.neighborlist import neighbor_list

from ase_bptt.data import generate as generate_module
from ase_bptt.data.db import TrajectoryDB
from ase_bptt.data.generate import generate, relax_frames
from ase_bptt.data.recipes import (
    SI_DEFECTS,
    SI_LATTICE_CONSTANT,
    MissingDependencyError,
    build_alloy,
    build_si_defect,
    stillinger_weber,
    tersoff,
)
from ase_bptt.data.splits import SplitFractions, split_of

TINY = dict(size=1, max_steps=60)  # 8-site cells, short relaxations: CI-sized
SW_COHESIVE = -4.3366  # eV/atom: -2*epsilon of Stillinger & Weber, PRB 31, 5262 (1985)


@pytest.fixture
def db(tmp_path):
    return TrajectoryDB(tmp_path / "g.db")


def test_stillinger_weber_reference_is_the_published_potential():
    atoms = bulk("Si", "diamond", a=SI_LATTICE_CONSTANT, cubic=True)
    atoms.calc = stillinger_weber()
    assert atoms.get_potential_energy() / len(atoms) == pytest.approx(SW_COHESIVE, abs=2e-4)
    assert np.abs(atoms.get_forces()).max() < 1e-10


def test_tersoff_reference_is_the_published_potential():
    # Tersoff, PRB 39, 5566 (1989): cohesive energies 4.63 eV (Si, a=5.432 A), 7.37 eV (C, a=3.566 A)
    for symbol, a, e_coh in (("Si", 5.432, -4.63), ("C", 3.566, -7.37)):
        atoms = bulk(symbol, "diamond", a=a, cubic=True)
        atoms.calc = tersoff()
        assert atoms.get_potential_energy() / len(atoms) == pytest.approx(e_coh, abs=5e-3)


@pytest.mark.parametrize(
    "defect, n_atoms",
    [
        ("vacancy", 63),
        ("divacancy", 62),
        ("interstitial-tetrahedral", 65),
        ("interstitial-hexagonal", 65),
        ("interstitial-split110", 65),
    ],
)
def test_si_defect_geometry(defect, n_atoms):
    rng = np.random.default_rng(0)
    atoms, label = build_si_defect(rng, "sw", defects=(defect,), sigma=0.0)
    assert label == defect and len(atoms) == n_atoms and set(atoms.get_chemical_symbols()) == {"Si"}
    a = SI_LATTICE_CONSTANT
    bond = np.sqrt(3) / 4 * a  # 2.352 A
    if defect == "interstitial-tetrahedral":
        # 4 neighbours at the bond length and 6 at a/2 (hand geometry of the T site)
        d = atoms.get_distances(len(atoms) - 1, range(len(atoms) - 1), mic=True)
        assert np.sum(np.isclose(d, bond, atol=1e-6)) == 4
        assert np.sum(np.isclose(d, a / 2, atol=1e-6)) == 6
    if defect == "interstitial-hexagonal":
        # centre of a six-membered ring: 6 neighbours at sqrt(11)/8 a
        d = atoms.get_distances(len(atoms) - 1, range(len(atoms) - 1), mic=True)
        assert np.sum(np.isclose(d, np.sqrt(11) / 8 * a, atol=1e-6)) == 6
    if defect == "divacancy":
        # 8 atoms lost a neighbour: 6 around the pair have 3 bonds
        i, _ = neighbor_list("ij", atoms, bond + 0.1)
        coordination = np.bincount(i, minlength=len(atoms))
        assert np.sum(coordination == 3) == 6 and np.sum(coordination == 4) == 56


def test_substitution_needs_a_second_element():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="tersoff"):
        build_si_defect(rng, "sw", defects=("substitution",))
    atoms, label = build_si_defect(rng, "tersoff", defects=("substitution",))
    assert label == "substitution-C" and atoms.get_chemical_symbols().count("C") == 1
    # default defect list with SW leaves substitution out
    labels = {build_si_defect(np.random.default_rng(i), "sw")[1] for i in range(40)}
    assert labels == set(SI_DEFECTS) - {"substitution"}


def test_si_defects_relaxed_against_reference(db):
    added = generate("si-defects", db, n=3, seed=1, progress=False, **TINY)
    assert added == 3
    trajs = db.trajectories(converged_only=False)
    assert [t.traj_id for t in trajs] == [f"si-defects-s1-{i:05d}" for i in range(3)]
    calc = stillinger_weber()
    for t in trajs:
        assert t.label in SI_DEFECTS and t.source == "generate:si-defects:sw"
        assert len(t.frames) >= 2
        for frame in (t.frames[0], t.frames[-1]):
            fresh = frame.copy()
            fresh.calc = calc
            assert np.abs(fresh.get_forces() - frame.get_forces()).max() < 1e-10
            assert fresh.get_potential_energy() == pytest.approx(frame.get_potential_energy(), abs=1e-10)
        fmax = np.linalg.norm(t.frames[-1].get_forces(), axis=1).max()
        # FIRE stops at 0.01 eV/A unless it runs out of steps
        assert fmax < 0.01 or len(t.frames) == TINY["max_steps"] + 1
        assert t.converged == (fmax < db.converged_fmax)


def test_deterministic_across_workers_and_resumable(tmp_path):
    one = TrajectoryDB(tmp_path / "one.db")
    two = TrajectoryDB(tmp_path / "two.db")
    assert generate("alloys", one, n=2, progress=False, **TINY) == 2
    assert generate("alloys", one, n=4, progress=False, **TINY) == 2  # only the missing ones
    assert generate("alloys", one, n=4, progress=False, **TINY) == 0
    assert generate("alloys", two, n=4, workers=2, progress=False, **TINY) == 4
    a, b = one.trajectories(converged_only=False), two.trajectories(converged_only=False)
    assert [t.traj_id for t in a] == [t.traj_id for t in b] == [f"alloys-s0-{i:05d}" for i in range(4)]
    for ta, tb in zip(a, b):
        assert ta.label == tb.label and len(ta.frames) == len(tb.frames)
        assert np.array_equal(ta.frames[-1].positions, tb.frames[-1].positions)


def kill_at(monkeypatch, at: int) -> None:
    """Make generate stop as if killed when it starts trajectory ``at``."""
    original = generate_module.make_trajectory

    def dies(recipe, index, **kw):
        if index == at:
            raise KeyboardInterrupt
        return original(recipe, index, **kw)

    monkeypatch.setattr(generate_module, "make_trajectory", dies)


def test_killed_run_keeps_finished_trajectories(db, monkeypatch):
    kill_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        generate("alloys", db, n=4, progress=False, **TINY)
    assert db.traj_ids() == {"alloys-s0-00000", "alloys-s0-00001"}
    monkeypatch.undo()
    assert generate("alloys", db, n=4, progress=False, **TINY) == 2


def test_each_trajectory_is_written_with_its_split(db, monkeypatch):
    kill_at(monkeypatch, 2)  # after two trajectories were stored, before the final assign_splits
    splits = SplitFractions(val=0.3, test=0.3, seed=5)
    with pytest.raises(KeyboardInterrupt):
        generate("alloys", db, n=4, progress=False, splits=splits, **TINY)
    stored = {t.traj_id: t.split for t in db.trajectories(converged_only=False)}
    assert stored == {tid: split_of(tid, 0.3, 0.3, 5) for tid in ("alloys-s0-00000", "alloys-s0-00001")}


def test_alloys_positions_only_and_labels(db):
    generate("alloys", db, n=2, seed=3, progress=False, **TINY)
    for t in db.trajectories(converged_only=False):
        a, b = t.label.split("-")
        assert set(t.frames[0].get_chemical_symbols()) == {a, b}
        assert all(np.array_equal(f.cell.array, t.frames[0].cell.array) for f in t.frames)
        assert len(t.frames[0]) == 4  # size=1: one conventional fcc cell


def test_relax_frames_matches_ase_fire():
    from ase.optimize import FIRE

    atoms, _ = build_alloy(np.random.default_rng(5), size=1)
    frames = relax_frames(atoms, EMT(), fmax=0.05, max_steps=200)
    ref = atoms.copy()
    ref.calc = EMT()
    opt = FIRE(ref, logfile=None)
    opt.run(fmax=0.05, steps=200)
    assert len(frames) == opt.nsteps + 1
    assert np.abs(frames[-1].positions - ref.positions).max() < 1e-12
    assert np.array_equal(frames[0].positions, atoms.positions)


@pytest.mark.parametrize("reference", ["ase.calculators.emt:EMT", EMT, EMT()])
def test_user_references(tmp_path, reference):
    db = TrajectoryDB(tmp_path / "r.db")
    assert generate("alloys", db, n=1, progress=False, reference=reference, **TINY) == 1
    (t,) = db.trajectories(converged_only=False)
    fresh = t.frames[-1].copy()
    fresh.calc = EMT()
    assert np.abs(fresh.get_forces() - t.frames[-1].get_forces()).max() < 1e-12


def test_errors(db, monkeypatch):
    with pytest.raises(ValueError, match="unknown recipe"):
        generate("graphene", db, n=1, progress=False)
    with pytest.raises(ValueError, match="no option"):
        generate("alloys", db, n=1, progress=False, colour="red")
    with pytest.raises(ValueError, match="module:Class"):
        generate("alloys", db, n=1, progress=False, reference="not-a-calculator")
    monkeypatch.setitem(sys.modules, "matscipy.calculators.manybody", None)
    with pytest.raises(MissingDependencyError, match=r"pip install ase-bptt\[matscipy\]"):
        generate("si-defects", db, n=1, progress=False)
    assert len(db) == 0


def test_resume_with_other_settings_is_an_error(db):
    generate("alloys", db, n=1, progress=False, **TINY)
    assert db.metadata["generated"]["alloys-s0"]["reference"] == "emt"
    with pytest.raises(ValueError, match="alloys-s0"):
        generate("alloys", db, n=2, progress=False, sigma=0.2, size=1, max_steps=60)
    assert generate("alloys", db, n=1, seed=1, progress=False, sigma=0.2, size=1, max_steps=60) == 1


def test_recipe_options_accept_one_name():
    from ase_bptt.data.recipes import RECIPES

    opts = RECIPES["si-defects"].options({"defects": "vacancy", "substituents": ["C"]})
    assert opts["defects"] == ("vacancy",) and opts["substituents"] == ("C",)
    atoms, label = build_si_defect(np.random.default_rng(0), "sw", **opts)
    assert label == "vacancy" and len(atoms) == 63


def test_paper_sized_cell():
    atoms, _ = build_si_defect(np.random.default_rng(0), "sw", size=3, defects=("vacancy",), sigma=0.0)
    assert len(atoms) == 215  # 216 sites (3x3x3 conventional cells) minus one
    assert np.allclose(atoms.cell.lengths(), 3 * SI_LATTICE_CONSTANT)


@pytest.mark.parametrize("defect", ["vacancy", "interstitial-tetrahedral", "interstitial-split110"])
def test_fixed_site_is_the_same_defect_in_every_cell(defect):
    """site="fixed": unrattled cells from different seeds are identical; "random" ones differ."""

    def build(seed, site):
        atoms, _ = build_si_defect(np.random.default_rng(seed), "sw", defects=(defect,), sigma=0.0, site=site)
        return atoms

    fixed = [build(seed, "fixed") for seed in range(4)]
    for other in fixed[1:]:
        assert np.array_equal(other.positions, fixed[0].positions)
    random = [build(seed, "random").positions for seed in range(4)]
    assert any(not np.array_equal(r, random[0]) for r in random[1:])
    if defect == "vacancy":
        # lattice site 0 (the origin) is the missing one
        perfect = bulk("Si", "diamond", a=SI_LATTICE_CONSTANT, cubic=True) * (2, 2, 2)
        assert np.allclose(fixed[0].positions, perfect.positions[1:], atol=1e-9)  # wrap() round-off
    with pytest.raises(ValueError, match="site must be"):
        build(0, "centre")


# ---------------------------------------------------- huge counts, interrupted runs (real processes)
def _generate_process(*args, limit_bytes: int | None = None):
    import os
    import resource
    import subprocess

    def limit() -> None:
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return subprocess.Popen(
        [sys.executable, "-m", "ase_bptt.cli", "-q", "generate", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        preexec_fn=limit,
    )


def _final_rows(path) -> int:
    import sqlite3
    from contextlib import closing

    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0)) as con:
            sql = "SELECT COUNT(*) FROM number_key_values WHERE key='is_final' AND value=1"
            return con.execute(sql).fetchone()[0]
    except sqlite3.OperationalError:  # not created yet, or being written
        return 0


#: Address space for a generate process: what it needs (about 0.5 GB), not what 10^8 indices need (GBs).
GENERATE_MEMORY = 1536 * 2**20


def test_a_huge_count_generates_at_once_in_bounded_memory(tmp_path):
    import signal
    import time

    path = tmp_path / "g.db"
    proc = _generate_process("alloys", path, "-n", "100000000", "--option", "size=1", limit_bytes=GENERATE_MEMORY)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and _final_rows(path) < 2:
        time.sleep(0.05)
    running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert running, f"generate ended before writing 2 trajectories: {err}"
    db = TrajectoryDB(path)
    assert len(db) >= 2 and db.check() == []


def test_interrupted_before_its_first_trajectory_a_new_database_is_removed(tmp_path):
    import signal
    import time

    path = tmp_path / "new.db"
    proc = _generate_process("si-defects", path, "-n", "1")  # a 64-site SW relaxation: seconds
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and not (path.exists() and path.stat().st_size):
        time.sleep(0.01)
    time.sleep(0.3)  # the database is made; the first relaxation is running
    assert proc.poll() is None and _final_rows(path) == 0
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    # click's "Aborted!" and exit 1; CPython sometimes ends such a process by SIGINT itself (a KeyboardInterrupt
    # raised while a module was being imported), which is the same outcome for the user.
    assert proc.returncode in (1, -signal.SIGINT) and "Aborted" in err, err
    assert not path.exists()
