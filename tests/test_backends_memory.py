"""The batch-size estimate for universal models: the backends' own figure, an upper bound on what autograd keeps."""

from __future__ import annotations

import pytest
import torch
from ase.build import bulk

from ase_bptt.batch import Batch
from ase_bptt.models.universal import load_universal_model
from ase_bptt.relax.batching import ModelSize, estimate_structure_bytes

#: The backends' figure covers the densest crystal measured (rock-salt MgO); on silicon, with 4 bonds per atom
#: under CHGNet's 3 A angle cutoff against MgO's 18, it is this many times what autograd saves at most.
LOOSEST_ON_SILICON = 6.0


def _saved_floats_per_atom(model, atoms) -> float:
    """Floats autograd saves in one training forward (forces with create_graph, as BPTT keeps them), per atom."""
    batch = Batch.from_atoms(atoms, dtype=torch.float32)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    positions = batch.positions.clone().requires_grad_(True)
    model(batch, positions)  # the neighbour graph is built outside what is measured
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(batch, positions)
    return sum(storages.values()) / len(atoms) / 4


@pytest.mark.parametrize("name", ["chgnet", "sevenn"])
def test_estimate_bounds_what_autograd_saves(name):
    pytest.importorskip(name)  # CI installs the extras (the test extra)
    model = load_universal_model(name)
    size = ModelSize.from_model(model)
    assert size.measured_floats == model.energy_model.memory_floats  # the backend's hook, not ADAPT's count
    with_grad = size.floats_per_atom_frame(64)
    # Per atom, what autograd saves depends on the atom's neighbourhood, not on the cell: 8-atom cells suffice.
    silicon = bulk("Si", "diamond", a=5.43, cubic=True)
    magnesia = bulk("MgO", "rocksalt", a=4.21, cubic=True)
    for atoms in (silicon, magnesia):
        atoms.rattle(0.05, seed=0)
    need_si, need_mgo = _saved_floats_per_atom(model, silicon), _saved_floats_per_atom(model, magnesia)
    assert need_si <= with_grad <= LOOSEST_ON_SILICON * need_si, (name, need_si, with_grad)
    assert need_mgo <= with_grad, (name, need_mgo, with_grad)
    # estimate(frames=1) counts two frames: the kept graph and one frame of gradients.
    assert estimate_structure_bytes(64, model, grad=True, frames=1) == 2 * 64 * with_grad * 4
    assert estimate_structure_bytes(64, model) == 64 * model.energy_model.memory_floats[1] * 4
