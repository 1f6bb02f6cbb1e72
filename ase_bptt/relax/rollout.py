"""The functional core of a relaxation: ``rollout`` unrolls frames for a whole Batch, keeping the graph.

One frame is ``X[t+1] = X[t] + update(F_theta(X[t]))``; :func:`rollout` repeats
it and returns the final positions with their autograd graph (what training
backpropagates through). Everything a frame changes travels in one
:class:`Carry` (positions, step-rule state, which structures still move,
which converged, frames taken), passed to and returned by :func:`relax_frame`.

Stopping, per structure: after a frame whose update has an RMS per-atom
displacement below ``tol`` (the paper's rule), when the largest force on a
movable atom is below ``fmax`` (if given; checked before the frame's update,
as ASE does), or after ``max_steps`` frames. Decisions are taken on detached
values and never differentiated; a stopped structure is frozen with
``torch.where``, and fixed and padding atoms never move.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ase_bptt.batch import Batch
from ase_bptt.metrics import max_force, rms_displacement
from ase_bptt.relax.base import State, StepRule
from ase_bptt.relax.defaults import DEFAULT_MAX_STEPS, DEFAULT_TOL
from ase_bptt.relax.recompute import recompute, segment_length, trainable_parameters

__all__ = ["Carry", "RolloutResult", "rollout", "relax_frame", "model_dtype_device"]


class RolloutResult(NamedTuple):
    """What :func:`rollout` returns.

    Attributes:
        positions: ``(B, N, 3)`` final positions (differentiable).
        n_frames: ``(B,)`` long, the number of updates each structure took.
        converged: ``(B,)`` bool, stopped by ``tol`` or ``fmax`` (not by ``max_steps``).
    """

    positions: torch.Tensor
    n_frames: torch.Tensor
    converged: torch.Tensor


class Carry(NamedTuple):
    """Everything one frame hands to the next.

    Attributes:
        positions: ``(B, N, 3)`` current positions (differentiable).
        state: the step rule's state (its keys fixed by ``init_state``).
        active: ``(B,)`` bool, still moving.
        converged: ``(B,)`` bool, stopped by ``tol`` or ``fmax``.
        n_frames: ``(B,)`` long, updates taken.
    """

    positions: torch.Tensor
    state: State
    active: torch.Tensor
    converged: torch.Tensor
    n_frames: torch.Tensor

    @classmethod
    def start(cls, rule: StepRule, batch: Batch, positions: torch.Tensor) -> Carry:
        """Before the first frame: every structure moving, none converged, the rule's fresh state."""
        b, device = positions.shape[0], positions.device
        active = torch.ones(b, dtype=torch.bool, device=device)
        n_frames = torch.zeros(b, dtype=torch.long, device=device)
        return cls(positions, rule.init_state(batch, positions), active, torch.zeros_like(active), n_frames)

    def stop_where(self, stop: torch.Tensor) -> Carry:
        """Mark the active structures in ``stop`` as converged and no longer moving."""
        return self._replace(converged=self.converged | (self.active & stop), active=self.active & ~stop)


def model_dtype_device(model: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    """The floating dtype and device of a model's parameters (float64 on CPU if it has none)."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.float64, torch.device("cpu")


def _where_movable(move: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(move, x, torch.zeros_like(x))


def relax_frame(
    model: torch.nn.Module,
    batch: Batch,
    rule: StepRule,
    frame: int,
    carry: Carry,
    *,
    tol: float | None,
    fmax: float | None = None,
    noise: torch.Tensor | None = None,
    forces: torch.Tensor | None = None,
) -> Carry:
    """One frame for the whole batch (``forces`` at ``carry.positions`` when already evaluated)."""
    movable = batch.movable[..., None]
    if forces is None:
        forces = model(batch, positions=carry.positions).forces
    # ASE applies FixAtoms to forces before any optimizer sees them; so do we.
    forces = _where_movable(movable, forces)
    if fmax is not None:
        carry = carry.stop_where(max_force(forces.detach(), batch) < fmax)
    update, state = rule(carry.positions, forces, batch, carry.state, frame, noise=noise)
    move = carry.active[:, None, None] & movable
    update = _where_movable(move, update)
    carry = carry._replace(
        positions=torch.where(move, carry.positions + update, carry.positions),
        state=state,
        n_frames=carry.n_frames + carry.active.long(),
    )
    if tol is not None:
        carry = carry.stop_where(rms_displacement(update.detach(), batch) < tol)
    return carry


def _draw_noise(rule: StepRule, positions: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor | None:
    # Drawn outside any checkpointed region, so the recomputation in backward
    # sees the same numbers whatever generator is used.
    if not rule.wants_noise:
        return None
    return torch.randn(positions.shape, generator=generator, dtype=positions.dtype, device=positions.device)


@dataclass(frozen=True)
class _Segment:
    """Frames ``start .. stop-1`` as one flat function of tensors (what :func:`recompute` wraps).

    ``recompute`` sees tensors only, so the carry goes in and out flat:
    ``(positions, active, converged, n_frames, noise, *state values)`` in,
    the same less ``noise`` out, the state's values in ``keys`` order (a rule
    keeps the keys its ``init_state`` gave). ``noise`` is None or
    ``(stop - start, B, N, 3)``, drawn outside so that the recomputation
    replays the same numbers. A structure that stops inside the segment is
    frozen by :func:`relax_frame`'s masks for the rest of it.
    """

    model: torch.nn.Module
    batch: Batch
    rule: StepRule
    start: int
    stop: int
    tol: float | None
    fmax: float | None
    keys: tuple[str, ...]

    def __call__(
        self,
        positions: torch.Tensor,
        active: torch.Tensor,
        converged: torch.Tensor,
        n_frames: torch.Tensor,
        noise: torch.Tensor | None,
        *state_values: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        carry = Carry(positions, dict(zip(self.keys, state_values)), active, converged, n_frames)
        for i, frame in enumerate(range(self.start, self.stop)):
            frame_noise = None if noise is None else noise[i]
            carry = relax_frame(
                self.model, self.batch, self.rule, frame, carry, tol=self.tol, fmax=self.fmax, noise=frame_noise
            )
        if tuple(carry.state) != self.keys:
            raise RuntimeError(
                f"step rule {self.rule.name!r} changed its state keys from {self.keys} to {tuple(carry.state)}; "
                "a rule's forward must return the keys its init_state gave (recomputed segments rely on it)."
            )
        return (carry.positions, carry.active, carry.converged, carry.n_frames, *carry.state.values())

    def run(self, carry: Carry, noise: torch.Tensor | None, params: tuple[torch.Tensor, ...]) -> Carry:
        """The segment under :func:`recompute` (activations dropped now, recomputed in backward)."""
        flat = (carry.positions, carry.active, carry.converged, carry.n_frames, noise, *carry.state.values())
        positions, active, converged, n_frames, *values = recompute(self, *flat, params=params)
        return Carry(positions, dict(zip(self.keys, values)), active, converged, n_frames)


class _LaggedFlag:
    """Reads "is any structure still moving?" one frame late on CUDA.

    A host read of the current frame's flag would drain the GPU queue every
    frame. Reading the previous frame's flag (copied asynchronously) keeps one
    frame queued; the price is at most one extra frame in which every
    structure is already frozen, which changes no number.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pending: tuple[torch.Tensor, Any] | None = None

    def any_moving(self, flag: torch.Tensor) -> bool:
        if not self.cuda:
            return bool(flag)
        previous = self.pending
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending = (host, event)
        if previous is None:
            return True
        previous[1].synchronize()
        return bool(previous[0])


class _Compactor:
    """Drops stopped structures from a rollout's working batch (no_grad on CPU only).

    A stopped structure is frozen but, kept in the batch, still costs a model
    evaluation every frame; without gradients nothing needs its graph, so it is
    written back to full-size results and removed. Only where the numbers stay
    the same: no exploration noise (its draw depends on the batch shape), and on
    CPU, where reading which structures stopped costs no device synchronisation.
    Each structure's frames do not depend on its batch mates, so the results
    equal the uncompacted run's (up to summation order in the model).
    """

    @staticmethod
    def applies(rule: StepRule, device: torch.device) -> bool:
        return not torch.is_grad_enabled() and device.type == "cpu" and not rule.wants_noise

    def __init__(self, carry: Carry) -> None:
        self.rows = torch.arange(carry.positions.shape[0], device=carry.positions.device)
        self.positions, self.converged = carry.positions.clone(), carry.converged.clone()
        self.n_frames = carry.n_frames.clone()

    def _write_back(self, carry: Carry) -> None:
        self.positions[self.rows] = carry.positions
        self.converged[self.rows] = carry.converged
        self.n_frames[self.rows] = carry.n_frames

    def drop_stopped(self, batch: Batch, carry: Carry) -> tuple[Batch, Carry]:
        """The batch and carry of the structures still moving (the others' results written back)."""
        self._write_back(carry)
        keep = torch.nonzero(carry.active).squeeze(1)
        self.rows = self.rows[keep]
        state = {k: v[keep] for k, v in carry.state.items()}
        kept = Carry(carry.positions[keep], state, carry.active[keep], carry.converged[keep], carry.n_frames[keep])
        return batch.select(keep), kept

    def result(self, carry: Carry) -> RolloutResult:
        self._write_back(carry)
        return RolloutResult(self.positions, self.n_frames, self.converged)


def rollout(
    model: torch.nn.Module,
    batch: Batch,
    step_rule: StepRule,
    *,
    tol: float | None = DEFAULT_TOL,
    max_steps: int = DEFAULT_MAX_STEPS,
    fmax: float | None = None,
    checkpoint_frames: bool | int = False,
    generator: torch.Generator | None = None,
    sync_active: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> RolloutResult:
    """Unroll a relaxation of every structure in ``batch``, keeping the autograd graph.

    Args:
        model: a ForceModel, ``model(batch, positions=X).forces``.
        batch: the initial structures (cast to the model's dtype and device).
        step_rule: the update rule (its state starts fresh).
        tol: stop a structure after a frame whose RMS per-atom displacement
            is below ``tol`` (A); None disables the rule.
        max_steps: most frames per structure.
        fmax: also stop a structure once its largest force is below ``fmax`` (eV/A).
        checkpoint_frames: trade time for memory while gradients are enabled.
            False: keep every frame's graph (naive BPTT). True: run the frames
            in segments of round(sqrt(max_steps)) frames, each under no_grad,
            keeping only the segment's inputs (positions, step-rule state,
            noise), and recompute a segment in backward
            (:func:`ase_bptt.relax.recompute.recompute`). An int: that many
            frames per segment (1 = every frame). Measured at k = 75 with
            the default ADAPT (``benchmarks/bench_bptt.py``): True keeps 14%
            of naive peak memory at 1.3-1.4x naive time. Not
            ``torch.utils.checkpoint``: its per-tensor pack/unpack hooks
            cost more than the recomputation for a model this small
            (2.0-2.3x time, 25% memory). Gradients equal naive BPTT's (the
            same operations run again); they reach the model's and step
            rule's parameters, not other tensors the model captures. Ignored
            under ``torch.no_grad``.
        generator: seeds the exploration noise (only drawn when the rule is in
            training mode with ``noise > 0``).
        sync_active: optional callable taking a 0-d float tensor (1.0 while any
            local structure still moves) and returning the global value (e.g.
            a DDP all-reduce with MAX), so every rank takes the same number of frames.

    Returns:
        :class:`RolloutResult` with the final positions, the frames each
        structure took and whether it converged.

    Host synchronisation: one boolean per frame ("is any structure still
    moving?"), or per segment with ``checkpoint_frames`` (so after the last
    structure stops up to segment - 1 frames run in which nothing moves;
    ``sync_active`` is likewise called once per segment, and every rank
    runs the same segments); on CUDA it is read one frame late (see ``_LaggedFlag``), so the
    GPU queue never drains. Stopping decisions stay on the device.

    Under ``torch.no_grad`` on CPU (without exploration noise or ``sync_active``), structures
    that have stopped are dropped from the working batch, so a batched
    relaxation stops paying model evaluations for them; the results are the
    same as without dropping (each structure's frames are independent of its
    batch mates).
    """
    dtype, device = model_dtype_device(model)
    batch = batch.to(device, dtype)
    carry = Carry.start(step_rule, batch, batch.positions)
    flag_reader = _LaggedFlag(device)
    segment = segment_length(checkpoint_frames, max_steps) if torch.is_grad_enabled() else 0
    compactor = _Compactor(carry) if sync_active is None and _Compactor.applies(step_rule, device) else None
    params = trainable_parameters(model, step_rule) if segment else ()
    start = 0
    while start < max_steps:
        if segment:
            stop = min(max_steps, start + segment)
            noises = [_draw_noise(step_rule, carry.positions, generator) for _ in range(start, stop)]
            noise = None if not step_rule.wants_noise else torch.stack([n for n in noises if n is not None])
            run = _Segment(model, batch, step_rule, start, stop, tol, fmax, tuple(carry.state))
            carry = run.run(carry, noise, params)
        else:
            stop = start + 1
            noise = _draw_noise(step_rule, carry.positions, generator)
            carry = relax_frame(model, batch, step_rule, start, carry, tol=tol, fmax=fmax, noise=noise)
        start = stop
        if compactor is not None and not bool(carry.active.all()):
            batch, carry = compactor.drop_stopped(batch, carry)
        flag = carry.active.any()
        if sync_active is not None:
            flag = sync_active(flag.to(dtype)) > 0
        if not flag_reader.any_moving(flag):
            break
    if compactor is not None:
        return compactor.result(carry)
    return RolloutResult(carry.positions, carry.n_frames, carry.converged)
