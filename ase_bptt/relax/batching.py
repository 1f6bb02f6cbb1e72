"""Batch sizes chosen from memory: split many structures into batches that fit, relax them batch after batch.

The most common failure of batched relaxers at scale is running out of
memory. :func:`estimate_structure_bytes` is an upper bound on the memory one
structure costs in a batch, from the model's size (token width, feed-forward
width, layers, heads; ADAPT's ``config``), its padded atom count and the frames
whose autograd graph is kept: every frame for naive BPTT, one segment of
round(sqrt(k)) frames with ``checkpoint_frames`` (plus each segment's inputs),
none without gradients (then one frame's working set). :func:`plan_batches`
sorts structures by size (padding costs: a batch is as wide as its largest
member) and fills batches greedily up to a budget: a fraction of the device's
free memory (``torch.cuda.mem_get_info`` plus this process's cached but unused
blocks on CUDA; ``MemAvailable`` and the cgroup limit on CPU). An explicit
``batch_size`` always wins. :func:`relax_in_batches` relaxes any number of
structures that way and says which batch size it chose.

The per-atom coefficients below count the tensors ADAPT's forward keeps for
backward (or holds at once without gradients), rounded up, plus the per-pair
tensors of a pair model (ADAPT-MI); they were checked
against measured peaks (``benchmarks/bench_memory_estimate.py``: the estimate
is an upper bound within :data:`ESTIMATE_FACTOR` of the measured peak on CPU).
A model of another architecture gives its own figure through a hook: a method
``memory_floats()`` returning the floats one atom keeps per frame with and
without gradients (the universal-model backends: their need grows with the
neighbours per atom, so their figure is set above the densest crystal measured
and is up to 5.5x loose on silicon; ``docs/backends.md``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
import torch
from ase import Atoms

from ase_bptt.errors import AseBpttError
from ase_bptt.relax.defaults import DEFAULT_MAX_STEPS
from ase_bptt.relax.recompute import segment_length

__all__ = [
    "ESTIMATE_FACTOR",
    "MEMORY_FRACTION",
    "BatchMemoryError",
    "RelaxationDivergedError",
    "ModelSize",
    "BatchedRelaxation",
    "available_memory",
    "memory_budget",
    "estimate_structure_bytes",
    "auto_batch_size",
    "plan_batches",
    "relax_in_batches",
]

log = logging.getLogger(__name__)

#: Share of the free memory a plan may use: the rest absorbs allocator
#: fragmentation and (on CPU) other processes; a GPU is usually ours alone.
MEMORY_FRACTION = {"cuda": 0.8, "cpu": 0.5}
#: The estimate is >= the measured peak and <= ESTIMATE_FACTOR times it (measured on CPU).
ESTIMATE_FACTOR = 5.0

# Floats per atom per frame that a forward keeps for backward, counted from
# ADAPT's forward and checked against measured peaks (bench_memory_estimate.py):
# per encoder layer ~12 x d_model (qkv, attention output, projection, three
# LayerNorms, residuals) and 2 x d_ff (the feed-forward hidden before and after
# GELU), plus heads x N for attention probabilities where the math kernel keeps
# them (float64 on CUDA, double backward; the fused kernels keep none, so this
# term over-counts there); tokens and embedding MLP outside the layers.
# Without gradients one layer's tensors and the embedding's are alive at once.
_LAYER_D, _LAYER_FF, _LAYER_ATTN = 12, 2, 1
_OUTER_INPUTS, _OUTER_D, _OUTER_FIXED = 4, 8, 64
# Floats per atom a recomputed segment keeps between segments (positions, forces, step-rule state).
_SEGMENT_INPUTS = 24
# Floats per atom *pair* per frame of a pair model (ADAPT-MI: every ordered pair carries its
# minimum-image geometry, ~6 n_rbf for the radial basis and the moments' copies, 2 d_pair for the pair
# MLP's hidden layer before and after SiLU, ~5 per head and layer for the attention biases, logits and
# probabilities, and ~48 of displacements, distances, unit vectors, envelope and masks). Counted from
# MinImageADAPT's forward and checked against the bytes autograd saves (tests/test_relax_batching.py):
# without it the estimate was 3-5x under ADAPT-MI's need at 64-128 atoms. Without gradients the same
# tensors are alive at once within a frame, so the count is used for both.
_PAIR_RBF, _PAIR_HIDDEN, _PAIR_BIAS, _PAIR_FIXED = 6, 2, 5, 48


class BatchMemoryError(AseBpttError, MemoryError):
    """One structure alone needs more memory than the budget allows."""


class RelaxationDivergedError(AseBpttError, FloatingPointError):
    """A relaxation reached non-finite positions (never handed back as a result)."""


@dataclass(frozen=True)
class ModelSize:
    """What the memory estimate needs to know about a force model."""

    d_model: int
    d_ff: int
    n_layers: int
    n_heads: int
    n_inputs: int
    n_parameters: int
    itemsize: int
    #: floats per atom pair per frame (0 for a model without pair tensors, such as ADAPT)
    pair_floats: int = 0
    #: floats per atom per frame (with gradients, without) given by the model's ``memory_floats()`` hook;
    #: when set, they replace the count from the widths above
    measured_floats: tuple[int, int] | None = None

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> ModelSize:
        """Read ADAPT's config; for other models, the widest linear layer stands in for both widths.

        A model wrapped by ``ConservativeForces`` is looked up through its ``energy_model``; a config
        with ``n_rbf`` and ``d_pair`` (ADAPT-MI) adds the pair tensors (``pair_floats``). A model with
        a ``memory_floats()`` method (a universal-model backend) gives its own floats per atom and frame.
        """
        params = [p for p in model.parameters() if p.is_floating_point()]
        itemsize = params[0].element_size() if params else 8
        n_parameters = sum(p.numel() for p in params)
        hook = getattr(model, "memory_floats", None)
        if callable(hook):
            with_grad, without = hook()
            return cls(0, 0, 0, 0, 0, n_parameters, itemsize, measured_floats=(int(with_grad), int(without)))
        inner = getattr(model, "energy_model", None)
        config = getattr(model, "config", None) or getattr(inner, "config", None)
        if config is not None and hasattr(config, "d_model"):
            pair_floats = 0
            if hasattr(config, "n_rbf") and hasattr(config, "d_pair"):
                pair_floats = (
                    _PAIR_RBF * int(config.n_rbf)
                    + _PAIR_HIDDEN * int(config.d_pair)
                    + _PAIR_BIAS * int(config.n_heads) * int(config.n_layers)
                    + _PAIR_FIXED
                )
            return cls(
                d_model=int(config.d_model),
                d_ff=int(config.d_ff),
                n_layers=int(config.n_layers),
                n_heads=int(config.n_heads),
                n_inputs=int(getattr(config, "n_inputs", config.d_model)),
                n_parameters=n_parameters,
                itemsize=itemsize,
                pair_floats=pair_floats,
            )
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        width = max((max(m.in_features, m.out_features) for m in linears), default=64)
        return cls(width, width, max(1, len(linears) // 4), 1, width, n_parameters, itemsize)

    def floats_per_atom_frame(self, n_atoms: int, *, grad: bool = True) -> int:
        """Floats per atom one frame keeps for backward (``grad``) or holds at once (without).

        The attention and pair terms grow with the padded atom count ``n_atoms``.
        """
        if self.measured_floats is not None:
            return self.measured_floats[0 if grad else 1]
        layer = _LAYER_D * self.d_model + _LAYER_FF * self.d_ff + _LAYER_ATTN * self.n_heads * n_atoms
        outer = _OUTER_INPUTS * self.n_inputs + _OUTER_D * self.d_model + _OUTER_FIXED
        return (self.n_layers if grad else 1) * layer + outer + self.pair_floats * n_atoms


def estimate_structure_bytes(
    n_atoms: int,
    model: torch.nn.Module | ModelSize,
    *,
    grad: bool = False,
    frames: int = DEFAULT_MAX_STEPS,
    checkpoint_frames: bool | int = False,
) -> int:
    """Upper bound on the bytes one structure of ``n_atoms`` (padded) atoms costs in a batched relaxation.

    Args:
        n_atoms: atoms per structure after padding (the batch's largest structure).
        model: the force model, or its :class:`ModelSize`.
        grad: gradients enabled (BPTT); False for inference relaxations.
        frames: frames per rollout (``max_steps``).
        checkpoint_frames: as in :func:`ase_bptt.relax.relaxer.rollout`.
    """
    size = model if isinstance(model, ModelSize) else ModelSize.from_model(model)
    if not grad:
        kept = n_atoms * size.floats_per_atom_frame(n_atoms, grad=False)
    else:
        per_frame = n_atoms * size.floats_per_atom_frame(n_atoms)
        segment = segment_length(checkpoint_frames, frames)
        graph_frames = min(segment, frames) if segment else frames
        n_segments = -(-frames // segment) if segment else 0
        # The kept graph, plus one frame's worth of gradients alive during backward.
        kept = (graph_frames + 1) * per_frame + n_segments * n_atoms * _SEGMENT_INPUTS
    return int(kept * size.itemsize)


def _cgroup_free_bytes() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), when limited."""
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            limit = fh.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as fh:
            return max(int(limit) - int(fh.read().strip()), 0)
    except (OSError, ValueError):
        return None


def available_memory(device: torch.device | str) -> int:
    """Bytes this process can still allocate on ``device``.

    CUDA: free device memory plus blocks torch's caching allocator holds but
    does not use. CPU: ``MemAvailable`` of ``/proc/meminfo`` (else
    ``os.sysconf``'s available pages), capped by a cgroup memory limit.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))
    if dev.type != "cpu":
        raise AseBpttError(f"automatic batch size: unsupported device {dev}; pass an explicit batch size.")
    available = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limited = _cgroup_free_bytes()
    return available if limited is None else min(available, limited)


def memory_budget(
    model: torch.nn.Module,
    *,
    device: torch.device | str | None = None,
    grad: bool = False,
    fraction: float | None = None,
) -> int:
    """Bytes a plan may fill: ``fraction`` of the free memory, less gradients and Adam state when training."""
    dev = torch.device(device) if device is not None else _model_device(model)
    share = MEMORY_FRACTION.get(dev.type, 0.5) if fraction is None else fraction
    if not 0 < share <= 1:
        raise AseBpttError(f"memory fraction must be in (0, 1], got {share}.")
    size = ModelSize.from_model(model)
    training_state = 3 * size.n_parameters * size.itemsize if grad else 0  # gradient + Adam's two moments
    return int(share * available_memory(dev)) - training_state


def _model_device(model: torch.nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _describe(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def auto_batch_size(
    n_atoms: int,
    model: torch.nn.Module,
    *,
    grad: bool = False,
    frames: int = DEFAULT_MAX_STEPS,
    checkpoint_frames: bool | int = False,
    budget: int | None = None,
    device: torch.device | str | None = None,
) -> int:
    """The most structures of ``n_atoms`` atoms that fit in ``budget`` bytes (default: :func:`memory_budget`).

    Raises:
        BatchMemoryError: when not even one fits.
    """
    budget = memory_budget(model, device=device, grad=grad) if budget is None else budget
    per = estimate_structure_bytes(n_atoms, model, grad=grad, frames=frames, checkpoint_frames=checkpoint_frames)
    _check_fits(per, budget, n_atoms, grad, frames)
    return budget // per


def _check_fits(per: int, budget: int, n_atoms: int, grad: bool, frames: int) -> None:
    if per > budget:
        what = f"{frames} frames with gradients" if grad else "a relaxation"
        raise BatchMemoryError(
            f"one {n_atoms}-atom structure needs about {_describe(per)} for {what} but the budget is "
            f"{_describe(max(budget, 0))}; use checkpoint_frames, fewer steps, a smaller model, "
            f"or force batch_size=1."
        )


def plan_batches(
    n_atoms: Sequence[int],
    model: torch.nn.Module,
    *,
    grad: bool = False,
    frames: int = DEFAULT_MAX_STEPS,
    checkpoint_frames: bool | int = False,
    batch_size: int | None = None,
    budget: int | None = None,
    device: torch.device | str | None = None,
) -> list[list[int]]:
    """Split structures (given by their atom counts) into batches of indices that fit in memory.

    Structures are taken smallest first (stable for equal sizes), so each batch
    holds similar sizes and pads little. An explicit ``batch_size`` wins: then
    the batches are consecutive runs of that many, in the same size order,
    and memory is not consulted.

    Args:
        n_atoms: atoms of each structure.
        model: the force model (its size, dtype and device).
        grad, frames, checkpoint_frames: as in :func:`estimate_structure_bytes`.
        batch_size: explicit structures per batch (wins over the memory plan).
        budget: bytes the plan may fill (default: :func:`memory_budget` of the model's device).
        device: where the relaxation runs (default: the model's device).

    Returns:
        Lists of indices into ``n_atoms``; every index appears exactly once.
    """
    order = sorted(range(len(n_atoms)), key=lambda i: n_atoms[i])
    if batch_size is not None:
        if batch_size < 1:
            raise AseBpttError(f"batch size must be at least 1, got {batch_size}.")
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if not order:
        return []
    budget = memory_budget(model, device=device, grad=grad) if budget is None else budget
    size = ModelSize.from_model(model)
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Sorted ascending, so structure i is the widest in the batch and sets its padding.
        per = estimate_structure_bytes(n_atoms[i], size, grad=grad, frames=frames, checkpoint_frames=checkpoint_frames)
        _check_fits(per, budget, n_atoms[i], grad, frames)
        if current and (len(current) + 1) * per > budget:
            batches.append(current)
            current = []
        current.append(i)
    batches.append(current)
    return batches


class BatchedRelaxation(NamedTuple):
    """What :func:`relax_in_batches` returns, in the order of the input structures.

    Attributes:
        atoms: the relaxed structures (energy and forces of the last frame attached, ``info`` kept).
        n_frames: frames each structure took.
        converged: whether each stopped by ``tol`` or ``fmax`` (not by the step limit).
        batches: the indices of each batch run, in the order run.
    """

    atoms: list[Atoms]
    n_frames: list[int]
    converged: list[bool]
    batches: list[list[int]]


def relax_in_batches(
    structures: Sequence[Atoms],
    model: Any,
    *,
    fmax: float | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    budget: int | None = None,
    report: Callable[[str], None] | None = None,
    **relaxer_options: Any,
) -> BatchedRelaxation:
    """Relax any number of structures, batch after batch, each batch as large as memory allows.

    Each batch is one :class:`~ase_bptt.relax.relaxer.DifferentiableRelaxer`
    run under ``torch.no_grad()``; each structure's frames do not depend on
    its batch mates, so the results equal one big batch's (up to summation order).

    Args:
        structures: the structures to relax (not modified).
        model: a ForceModel, a ``BPTTCalculator`` or a checkpoint path, as for the relaxer.
        fmax, steps: as in :meth:`DifferentiableRelaxer.run`.
        batch_size: explicit structures per batch (wins over the memory plan).
        budget: bytes a batch may fill (default: :func:`memory_budget` of the model's device).
        report: called with one line naming the batch size chosen (default: ``logging`` at INFO).
        **relaxer_options: passed to ``DifferentiableRelaxer`` (``step``, ``eta``, ``tol``, ``maxstep``).
    """
    from ase_bptt.relax.relaxer import DifferentiableRelaxer, _resolve_model

    force_model, settings = _resolve_model(model)
    # Load a checkpoint once, not per batch; the relaxer reads the same model and settings from this.
    source = SimpleNamespace(model=force_model, relax_settings=settings)
    sizes = [len(a) for a in structures]
    batches = plan_batches(sizes, force_model, batch_size=batch_size, budget=budget)
    say = report or log.info
    widest = max((len(b) for b in batches), default=0)
    how = "as given" if batch_size is not None else "chosen from memory"
    say(f"relaxing {len(structures)} structures in {len(batches)} batch(es) of up to {widest} ({how})")
    relaxed: list[Atoms | None] = [None] * len(structures)
    n_frames = [0] * len(structures)
    converged = [False] * len(structures)
    for batch in batches:
        with torch.no_grad():
            relaxer = DifferentiableRelaxer([structures[i] for i in batch], source, **relaxer_options)
            relaxer.run(fmax=fmax, steps=steps)
        for i, atoms, frames, done in zip(
            batch, relaxer.get_atoms(), relaxer.n_frames.tolist(), relaxer.structure_converged.tolist()
        ):
            if not np.isfinite(atoms.positions).all():
                raise RelaxationDivergedError(
                    f"structure {i} ({atoms.get_chemical_formula()}) reached non-finite positions after "
                    f"{int(frames)} frames; check the model on it or relax with a smaller step."
                )
            relaxed[i], n_frames[i], converged[i] = atoms, int(frames), bool(done)
    return BatchedRelaxation([a for a in relaxed if a is not None], n_frames, converged, batches)
