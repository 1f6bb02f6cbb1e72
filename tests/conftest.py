"""Shared fixtures: small silicon cells and tiny models, so the suite stays fast."""

from __future__ import annotations

import os

# Before numpy loads: OpenBLAS threads fighting torch's make ASE's BFGS 5x slower.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk
from torch import nn

from ase_bptt.batch import Batch
from ase_bptt.metrics import dq, minimum_image
from ase_bptt.models.base import ForceModel, ModelOutput
from ase_bptt.relax.base import safe_norm
from ase_bptt.relax.rollout import rollout

# Keep the suite predictable on a 2-core CI machine.
torch.set_num_threads(2)

#: Real VASP relaxations committed with the tests (sources and licences: data/vasp/SOURCES.md).
VASP_DATA = Path(__file__).resolve().parent / "data" / "vasp"


def silicon_vacancy(repeat: int = 2, rattle: float = 0.1, seed: int = 0):
    """Diamond Si, ``repeat`` conventional cells per side, one vacancy, rattled."""
    atoms = bulk("Si", "diamond", a=5.43, cubic=True) * (repeat, repeat, repeat)
    del atoms[0]
    rng = np.random.default_rng(seed)
    atoms.positions += rng.normal(scale=rattle, size=atoms.positions.shape)
    return atoms


@pytest.fixture
def si_vacancy():
    """Rattled 64-site silicon cell with one vacancy (63 atoms)."""
    return silicon_vacancy()


@pytest.fixture
def si_small():
    """Rattled 8-site silicon cell with one vacancy (7 atoms): for gradient checks."""
    return silicon_vacancy(repeat=1, rattle=0.05, seed=1)


@pytest.fixture
def vasp_data() -> Path:
    """``tests/data/vasp``: real VASP outputs in the repository (read them, never write)."""
    return VASP_DATA


def three_structures():
    """7, 6 and 15 atoms; they converge at different frames under MorseModel with eta 0.05."""
    a = silicon_vacancy(repeat=1, rattle=0.05, seed=1)
    b = silicon_vacancy(repeat=1, rattle=0.1, seed=2)
    del b[3]
    c = silicon_vacancy(repeat=1, rattle=0.03, seed=3) * (2, 1, 1)
    return [a, b, c]


# ------------------------------------------------ a tiny model and gradient checks for the relax tests
GRAD_RTOL = 1e-5  # the bound on relative error against central differences
FD_STEP = 1e-5  # central-difference step along a unit direction in parameter space


class MorseModel(ForceModel):
    """Nearest-neighbour Morse pair forces (minimum image) plus a small learned pair term.

    ``F_i = sum_j g(r_ij) r_ij / |r_ij|`` with ``g = (phi c)' + c mlp(r)``,
    ``phi = D (1 - exp(-a (r - r0)))^2`` and a smooth cutoff ``c`` between
    2.9 and 3.4 A (between the first and second neighbours of silicon, so
    the diamond cell relaxes instead of collapsing). Energy is ``sum phi c``.
    Forces are closed form (no autograd inside), so they also work under
    ``torch.no_grad`` in a calculator.
    """

    r_on, r_cut = 2.9, 3.4

    def __init__(self, *, dtype: torch.dtype = torch.float64, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.D = nn.Parameter(torch.tensor(0.5, dtype=dtype))
        self.a = nn.Parameter(torch.tensor(2.0, dtype=dtype))
        self.r0 = nn.Parameter(torch.tensor(2.35, dtype=dtype))
        self.w0 = nn.Parameter(0.5 * torch.randn(4, generator=g, dtype=torch.float64).to(dtype))
        self.b0 = nn.Parameter(0.5 * torch.randn(4, generator=g, dtype=torch.float64).to(dtype))
        self.w1 = nn.Parameter(0.1 * torch.randn(4, generator=g, dtype=torch.float64).to(dtype))

    def forward(self, batch: Batch, positions: torch.Tensor | None = None) -> ModelOutput:
        pos = batch.positions if positions is None else positions
        b, n, _ = pos.shape
        rij = pos[:, None, :, :] - pos[:, :, None, :]  # [b, i, j] = x_j - x_i
        rij = minimum_image(rij.reshape(b, n * n, 3), batch.cell, batch.pbc).reshape(b, n, n, 3)
        eye = torch.eye(n, dtype=torch.bool, device=pos.device)
        pair = batch.mask[:, :, None] & batch.mask[:, None, :] & ~eye
        r = torch.where(pair, safe_norm(rij), torch.ones_like(pair, dtype=pos.dtype))
        x = ((r - self.r_on) / (self.r_cut - self.r_on)).clamp(0.0, 1.0)
        c = 0.5 * (1.0 + torch.cos(math.pi * x))
        dc = torch.where(
            (x > 0) & (x < 1), -0.5 * math.pi * torch.sin(math.pi * x) / (self.r_cut - self.r_on), torch.zeros_like(x)
        )
        e = torch.exp(-self.a * (r - self.r0))
        phi = self.D * (1.0 - e) ** 2
        dphi = 2.0 * self.D * self.a * e * (1.0 - e)
        learned = torch.tanh(r[..., None] * self.w0 + self.b0) @ self.w1
        g = torch.where(pair, dphi * c + phi * dc + learned * c, torch.zeros_like(r))
        forces = (g[..., None] * rij / r[..., None]).sum(dim=2)
        energy = 0.5 * torch.where(pair, phi * c, torch.zeros_like(r)).sum(dim=(1, 2))
        return ModelOutput(forces=forces, energy=energy)


def reference_for(batch: Batch, seed: int = 3) -> torch.Tensor:
    """A made-up 'relaxed' target near the initial positions."""
    g = torch.Generator().manual_seed(seed)
    return batch.positions + 0.05 * torch.randn(batch.positions.shape, generator=g, dtype=batch.positions.dtype)


def check_gradients(
    model: nn.Module,
    rule: nn.Module,
    batch: Batch,
    *,
    frames: int,
    checkpoint_frames: bool,
    n_directions: int = 3,
    extra_directions: list[dict[str, float]] | None = None,
) -> None:
    """Directional derivatives of Dq(final) along random unit directions vs central differences."""
    ref = reference_for(batch)
    params = [p for p in list(model.parameters()) + list(rule.parameters()) if p.requires_grad]
    names = {
        id(p): n for n, p in list(model.named_parameters()) + [("rule." + k, v) for k, v in rule.named_parameters()]
    }

    def loss() -> torch.Tensor:
        out = rollout(model, batch, rule, tol=None, max_steps=frames, checkpoint_frames=checkpoint_frames)
        assert int(out.n_frames.min()) == frames
        return dq(out.positions, ref, batch).sum()

    value = loss()
    grads = torch.autograd.grad(value, params)
    g = torch.Generator().manual_seed(11)
    directions = []
    for _ in range(n_directions):
        d = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) for p in params]
        norm = math.sqrt(sum(float((x * x).sum()) for x in d))
        directions.append([x / norm for x in d])
    for extra in extra_directions or []:
        directions.append([torch.full_like(p, extra.get(names[id(p)], 0.0)) for p in params])
    for d in directions:
        analytic = sum(float((gi * di).sum()) for gi, di in zip(grads, d))
        with torch.no_grad():
            for p, di in zip(params, d):
                p.add_(FD_STEP * di)
            plus = float(loss())
            for p, di in zip(params, d):
                p.sub_(2 * FD_STEP * di)
            minus = float(loss())
            for p, di in zip(params, d):
                p.add_(FD_STEP * di)
        numeric = (plus - minus) / (2 * FD_STEP)
        assert abs(numeric) > 1e-6, "direction with no effect: the check would be vacuous"
        assert abs(analytic - numeric) <= GRAD_RTOL * abs(numeric), (analytic, numeric)


def tiny_adapt(seed: int = 0, force_scale: float | None = None):
    """Random tiny float64 ADAPT; ``force_scale`` 30 makes forces O(1) eV/A, so relaxations take many steps."""
    from ase_bptt.models.adapt import ADAPT, ADAPTConfig

    torch.manual_seed(seed)
    model = ADAPT(ADAPTConfig(d_model=8, d_ff=16, n_layers=1, n_heads=2, frequencies=(1,))).double()
    if force_scale is not None:
        model.force_scale.fill_(force_scale)
    return model


# ------------------------------------------------- EMT copper relaxations
#: The smallest ADAPT the training tests use (fast, still every code path).
TINY_MODEL = {"d_model": 16, "d_ff": 32, "n_layers": 1, "n_heads": 2}


def emt_cu_relaxation(
    seed: int, *, repeat=(2, 1, 1), vacancy: bool = True, rattle: float = 0.12, fmax: float = 0.05, steps: int = 60
) -> list:
    """Every frame of an ASE FIRE relaxation of a rattled cubic Cu cell under EMT (the package's relax_frames).

    Default: a 2x1x1 cell with a vacancy (7 atoms), Gaussian rattle from ``default_rng(seed)``.
    """
    from ase.calculators.emt import EMT

    from ase_bptt.data.generate import relax_frames

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * repeat
    if vacancy:
        del atoms[0]
    atoms.positions += np.random.default_rng(seed).normal(scale=rattle, size=atoms.positions.shape)
    return relax_frames(atoms, EMT(), fmax=fmax, max_steps=steps)


def make_cu_db(path: Path, *, n_train: int = 6, n_val: int = 2, n_test: int = 1, seed: int = 0):
    """A TrajectoryDB of EMT Cu vacancy relaxations (:func:`emt_cu_relaxation`), splits assigned by hand."""
    from ase_bptt.data.db import TrajectoryDB

    db = TrajectoryDB(path)
    k = seed * 1000
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for _ in range(n):
            db.add_trajectory(emt_cu_relaxation(k), label="vacancy", source="test", split=split)
            k += 1
    return db


# ------------------------------------------------- universal-model backends (tests/test_backends_*.py)
def small_backend(name: str, *, skin: float = 0.5, seed: int = 0, dtype: torch.dtype = torch.float64):
    """The backend's small untrained architecture (``Backend.small_architecture``), float64 by default."""
    from ase_bptt.backends import backend_class
    from ase_bptt.models.universal import load_universal_model

    torch.manual_seed(seed)
    architecture = backend_class(name).small_architecture
    return load_universal_model(name, architecture=architecture, skin=skin, dtype=dtype)


def freeze_unused(model, batch: Batch, frames: int) -> int:
    """Freeze the parameters a rollout's loss never reaches (CHGNet's magnetic-moment head, ...); return how many."""
    from ase_bptt.relax.steps import FixedStep

    out = rollout(model, batch, FixedStep(0.05), tol=None, max_steps=frames)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(dq(out.positions, reference_for(batch), batch).sum(), params, allow_unused=True)
    for p, g in zip(params, grads):
        p.requires_grad_(g is not None)
    return sum(g is None for g in grads)


def _chgnet_calculator(monkeypatch, net):
    # CHGNet hard-codes float32 in its graph converter and composition model.
    import copy

    import chgnet.graph.converter
    import chgnet.model.model
    from chgnet.model.dynamics import CHGNetCalculator

    monkeypatch.setattr(chgnet.graph.converter, "TORCH_DTYPE", torch.float64)
    monkeypatch.setattr(chgnet.model.model, "TORCH_DTYPE", torch.float64)
    net = copy.deepcopy(net).double()
    assemble = net.composition_model._assemble_graphs
    net.composition_model._assemble_graphs = lambda graphs: assemble(graphs).double()
    return CHGNetCalculator(net, use_device="cpu", on_isolated_atoms="ignore")


def _sevenn_calculator(monkeypatch, net):
    # SevenNet converts its input graph and its one-hot embedding to float32 whatever the model's dtype.
    import copy
    import functools

    import sevenn.nn.node_embedding
    import sevenn.util
    from sevenn.calculator import SevenNetCalculator

    monkeypatch.setattr(
        sevenn.util, "dtype_correct", functools.partial(sevenn.util.dtype_correct, float_dtype=torch.float64)
    )
    one_hot = sevenn.nn.node_embedding.OnehotEmbedding.forward

    def one_hot_float64(self, data):
        data = one_hot(self, data)
        for key in {self.key_output, self.key_additional_output} - {None}:
            data[key] = data[key].double()
        return data

    monkeypatch.setattr(sevenn.nn.node_embedding.OnehotEmbedding, "forward", one_hot_float64)
    return SevenNetCalculator(copy.deepcopy(net).double(), file_type="model_instance", device="cpu")


@pytest.fixture
def package_calculator(monkeypatch):
    """``make(name, net)``: the package's own ASE calculator (CHGNetCalculator, SevenNetCalculator) on a float64
    copy of the backend's ``net``.

    Both packages hard-code float32 somewhere on their input path (their own float32 noise on these cells is
    1e-5 to 1e-4 eV/A); it is patched to float64 here so a comparison at 1e-5 eV/A measures our graph, not rounding.
    """
    return lambda name, net: {"chgnet": _chgnet_calculator, "sevenn": _sevenn_calculator}[name](monkeypatch, net)
