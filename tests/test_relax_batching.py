"""Automatic batch size: the memory estimate, the plan, and relaxations run batch after batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk

from ase_bptt.batch import Batch
from ase_bptt.errors import AseBpttError
from ase_bptt.models.adapt import ADAPT, ADAPTConfig
from ase_bptt.models.mi_attention import MinImageADAPT, MinImageADAPTConfig
from ase_bptt.relax.batching import (
    ESTIMATE_FACTOR,
    BatchMemoryError,
    ModelSize,
    RelaxationDivergedError,
    auto_batch_size,
    available_memory,
    estimate_structure_bytes,
    memory_budget,
    plan_batches,
    relax_in_batches,
)

# Batched and one-batch relaxations differ only by summation order inside the model (float64).
POSITION_TOLERANCE_A = 1e-10


@pytest.fixture(scope="module")
def model64() -> ADAPT:
    torch.manual_seed(0)
    return ADAPT(ADAPTConfig(d_model=16, d_ff=32, n_layers=1, n_heads=2)).double().eval()


def _cells(n: int) -> list:
    """Rattled silicon cells of 2, 8 and 14 atoms (different sizes, so batches pad)."""
    out = []
    for i in range(n):
        atoms = bulk("Si", "diamond", a=5.43) * (1, 1, 1 + i % 3 * 3)
        if i % 3 == 1:
            atoms = bulk("Si", "diamond", a=5.43, cubic=True)
        atoms.rattle(0.05, seed=i)
        atoms.info["label"] = f"cell-{i}"
        out.append(atoms)
    return out


# --------------------------------------------------------------- estimate
def test_estimate_grows_with_atoms_and_frames(model64):
    base = estimate_structure_bytes(16, model64, grad=True, frames=10)
    assert estimate_structure_bytes(32, model64, grad=True, frames=10) > 2 * base  # attention: faster than linear
    assert estimate_structure_bytes(16, model64, grad=True, frames=20) > 1.8 * base
    # Without gradients one frame's working set, whatever the number of frames.
    no_grad = estimate_structure_bytes(16, model64, grad=False, frames=10)
    assert no_grad == estimate_structure_bytes(16, model64, grad=False, frames=1000) < base
    # Checkpointed frames keep one segment's graph: far less than naive at k = 75.
    naive = estimate_structure_bytes(16, model64, grad=True, frames=75)
    checkpointed = estimate_structure_bytes(16, model64, grad=True, frames=75, checkpoint_frames=True)
    assert checkpointed < 0.2 * naive


def test_estimate_scales_with_dtype_and_model_size():
    torch.manual_seed(0)
    small = ADAPT(ADAPTConfig(d_model=16, d_ff=32, n_layers=1, n_heads=2))
    big = ADAPT(ADAPTConfig(d_model=64, d_ff=128, n_layers=3, n_heads=4))
    assert ModelSize.from_model(big).n_layers == 3 and ModelSize.from_model(big).itemsize == 4
    assert estimate_structure_bytes(64, big, grad=True) > 3 * estimate_structure_bytes(64, small, grad=True)
    assert estimate_structure_bytes(64, big) > 2 * estimate_structure_bytes(64, small)  # one layer at a time
    assert estimate_structure_bytes(64, small.double()) == 2 * estimate_structure_bytes(64, small.float())


def _saved_bytes_per_structure(model: torch.nn.Module, cells: list) -> tuple[int, float]:
    """Padded atom count and the bytes autograd saves for backward in one forward, per structure (each
    storage counted once): an independent measure of what one BPTT frame keeps."""
    batch = Batch.from_atoms(cells)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    positions = batch.positions.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(batch, positions)
    return int(batch.mask.shape[1]), sum(storages.values()) / len(cells)


@pytest.mark.parametrize("name", ["adapt", "adapt-mi"])
def test_estimate_bounds_what_autograd_saves(name):
    """Per frame, the estimate is at least the bytes autograd saves in a forward and at most
    ESTIMATE_FACTOR times them, for ADAPT and for ADAPT-MI (whose per-pair tensors dominate: before they
    were counted the estimate was 3-5x too small), at 64 and 128 atoms."""
    torch.manual_seed(0)
    model = ADAPT(ADAPTConfig()) if name == "adapt" else MinImageADAPT(MinImageADAPTConfig())
    for repeat in (2, 4):  # 64 and 128 atoms: the pair share grows with N
        cells = []
        for seed in range(2):
            atoms = bulk("Si", "diamond", a=5.43, cubic=True) * (2, 2, repeat)
            atoms.rattle(0.05, seed=seed)
            cells.append(atoms)
        n_atoms, saved = _saved_bytes_per_structure(model, cells)
        # estimate(frames=1) counts two frames: the kept graph and one frame of gradients.
        per_frame = estimate_structure_bytes(n_atoms, model, grad=True, frames=1) / 2
        assert saved <= per_frame <= ESTIMATE_FACTOR * saved, (name, n_atoms, saved, per_frame)


def test_available_memory_on_cpu_is_positive_and_budget_is_a_fraction(model64):
    free = available_memory("cpu")
    assert 0 < free < 2**50
    assert 0 < memory_budget(model64, fraction=0.5) <= 0.5 * free * 1.05  # free memory moves a little between reads
    with pytest.raises(AseBpttError, match="fraction"):
        memory_budget(model64, fraction=1.5)


# -------------------------------------------------------------------- plan
def test_plan_covers_every_structure_once_smallest_first(model64):
    sizes = [16, 2, 8, 2, 16, 8]
    batches = plan_batches(sizes, model64, budget=2**40)
    assert batches == [[1, 3, 2, 5, 0, 4]]
    per = estimate_structure_bytes(16, model64)
    small = plan_batches(sizes, model64, budget=2 * per)
    assert sorted(i for b in small for i in b) == list(range(6)) and len(small) > 1
    for batch in small:  # each batch fits: its size times the estimate at its widest member
        assert len(batch) * estimate_structure_bytes(max(sizes[i] for i in batch), model64) <= 2 * per
        assert [sizes[i] for i in batch] == sorted(sizes[i] for i in batch)


def test_explicit_batch_size_wins_over_memory(model64):
    sizes = [16] * 7
    assert plan_batches(sizes, model64, batch_size=3, budget=1) == [[0, 1, 2], [3, 4, 5], [6]]
    with pytest.raises(AseBpttError, match="at least 1"):
        plan_batches(sizes, model64, batch_size=0)


def test_structure_larger_than_the_budget_is_a_clear_error(model64):
    with pytest.raises(BatchMemoryError, match="one 16-atom structure needs about .* batch_size=1"):
        plan_batches([2, 16], model64, budget=estimate_structure_bytes(8, model64))
    assert issubclass(BatchMemoryError, MemoryError) and issubclass(BatchMemoryError, AseBpttError)


def test_auto_batch_size_grad_and_checkpointing(model64):
    budget = 50 * estimate_structure_bytes(16, model64, grad=True, frames=75)
    naive = auto_batch_size(16, model64, grad=True, frames=75, budget=budget)
    assert naive == 50
    assert auto_batch_size(16, model64, grad=True, frames=75, checkpoint_frames=True, budget=budget) > 5 * naive


# ------------------------------------------------------------------ relax
def test_relax_in_batches_equals_one_big_batch(model64):
    cells = _cells(7)
    settings = {"step": "fixed", "eta": 0.05, "tol": 1e-3}
    lines: list[str] = []
    one = relax_in_batches(cells, model64, steps=20, batch_size=len(cells), **settings)
    budget = 2 * estimate_structure_bytes(16, model64)  # an artificially small memory: a few per batch
    split = relax_in_batches(cells, model64, steps=20, budget=budget, report=lines.append, **settings)
    assert len(one.batches) == 1 and len(split.batches) >= 3
    assert len(lines) == 1 and f"in {len(split.batches)} batch(es)" in lines[0] and "chosen from memory" in lines[0]
    assert split.n_frames == one.n_frames and split.converged == one.converged
    assert max(split.n_frames) > 1  # they moved
    for a, b, original in zip(split.atoms, one.atoms, cells):
        assert len(a) == len(original) and a.info["label"] == original.info["label"]
        assert np.abs(a.positions - b.positions).max() <= POSITION_TOLERANCE_A
        assert not np.allclose(a.positions, original.positions)
    assert all(c.positions is not a.positions for c, a in zip(cells, split.atoms))


def test_relax_in_batches_reports_an_explicit_batch_size(model64):
    lines: list[str] = []
    out = relax_in_batches(_cells(5), model64, steps=2, batch_size=2, report=lines.append)
    assert [len(b) for b in out.batches] == [2, 2, 1]
    assert "of up to 2 (as given)" in lines[0]


def test_non_finite_relaxation_is_an_error_naming_the_structure(model64):
    class Diverging(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model64

        def forward(self, batch, positions=None):
            out = self.inner(batch, positions=positions)
            return out._replace(forces=out.forces * float("nan"))

    with pytest.raises(RelaxationDivergedError, match=r"structure \d+ \(Si\d*\) reached non-finite positions"):
        relax_in_batches(_cells(3), Diverging(), steps=2, batch_size=3)
