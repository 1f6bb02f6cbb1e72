"""The backends' neighbour-graph cache: built with a skin, reused, rebuilt per structure after skin/2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.neighborlist import neighbor_list
from conftest import silicon_vacancy

from ase_bptt.backends.graph import GraphCache, NonFinitePositionsError, neighbour_pairs
from ase_bptt.batch import Batch


class Recorder:
    """build/assemble callbacks that record which structures were built."""

    def __init__(self) -> None:
        self.built: list[int] = []

    def build(self, positions, cell, pbc, numbers):
        self.built.append(len(numbers))
        return len(numbers)

    def assemble(self, graphs, batch):
        return list(graphs)


def test_neighbour_pairs_are_ases_with_vectors_from_shifts():
    atoms = silicon_vacancy(repeat=1, rattle=0.3, seed=1)
    atoms.positions[0] -= 1.0  # outside the cell: the shifts still give the pair vectors
    i, j, shifts, d = neighbour_pairs(atoms.positions, atoms.cell.array, atoms.pbc, 4.0)
    vectors = atoms.positions[j] + shifts @ atoms.cell.array - atoms.positions[i]
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), d, atol=1e-12)
    assert len(i) == len(neighbor_list("i", atoms, 4.0)) and not np.any((i == j) & ~shifts.any(axis=1))


def test_graphs_are_reused_until_an_atom_moved_half_the_skin():
    a, b = silicon_vacancy(repeat=1, seed=2), silicon_vacancy(repeat=1, seed=3)
    del b[0]
    batch = Batch.from_atoms([a, b])
    cache, rec = GraphCache(skin=0.4), Recorder()
    pos = batch.positions.clone()
    assert cache.get(batch, pos, rec.build, rec.assemble) == [7, 6]
    pos[1, 2, 0] += 0.19  # under skin/2: nothing rebuilt
    cache.get(batch, pos, rec.build, rec.assemble)
    assert cache.n_builds == 2
    pos[1, 2, 0] += 0.02  # 0.21 > 0.2 since the build: only structure 1 is rebuilt
    cache.get(batch, pos, rec.build, rec.assemble)
    assert cache.n_builds == 3 and rec.built[-1] == 6
    pos[1, 2, 0] += 0.19  # measured from the rebuild, not from the start
    cache.get(batch, pos, rec.build, rec.assemble)
    assert cache.n_builds == 3
    pos[1, 6, 0] += 1.0  # a padding atom moving changes nothing
    cache.get(batch, pos, rec.build, rec.assemble)
    assert cache.n_builds == 3


def test_a_new_batch_with_the_same_values_reuses_the_graphs_and_other_structures_rebuild():
    atoms = silicon_vacancy(repeat=1, seed=4)
    cache, rec = GraphCache(skin=0.4), Recorder()
    for _ in range(3):  # a calculator hands over a new Batch every step
        batch = Batch.from_atoms(atoms)
        cache.get(batch, batch.positions, rec.build, rec.assemble)
    assert cache.n_builds == 1
    other = atoms.copy()
    other.numbers[0] = 6
    batch = Batch.from_atoms(other)
    cache.get(batch, batch.positions, rec.build, rec.assemble)
    batch = Batch.from_atoms(atoms, dtype=torch.float32)
    cache.get(batch, batch.positions, rec.build, rec.assemble)
    assert cache.n_builds == 3


def test_non_finite_positions_are_an_error_not_a_graph():
    batch = Batch.from_atoms(bulk("Si", "diamond", a=5.43))
    pos = batch.positions.clone()
    pos[0, 1, 2] = float("nan")
    rec = Recorder()
    with pytest.raises(NonFinitePositionsError, match="structure 0 of the batch has non-finite positions"):
        GraphCache(skin=0.4).get(batch, pos, rec.build, rec.assemble)


def test_the_backends_room_imports_no_higher_room():
    """DESIGN.md: backends sit below models (models/universal.py wraps them) and know nothing of them."""
    import ast
    from pathlib import Path

    import ase_bptt.backends

    allowed = ("ase_bptt.backends", "ase_bptt.batch", "ase_bptt.errors", "ase_bptt.registry")
    for path in Path(ase_bptt.backends.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):  # lazy imports inside functions too
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                assert not name.startswith("ase_bptt") or name.startswith(allowed), (path.name, name)


def test_a_backend_package_cannot_change_the_default_dtype(tmp_path, monkeypatch):
    from ase_bptt.backends import Backend, backend_names, register_backend, unregister_backend

    (tmp_path / "dtype_changing_mlip.py").write_text("import torch\ntorch.set_default_dtype(torch.float64)\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    @register_backend
    class Changing(Backend):
        name = "dtype-changing"
        package = "dtype_changing_mlip"

    try:
        assert "dtype-changing" in backend_names()
        before = torch.get_default_dtype()
        Changing.import_package()
        assert torch.get_default_dtype() == before
    finally:
        unregister_backend("dtype-changing")
    assert "dtype-changing" not in backend_names()
