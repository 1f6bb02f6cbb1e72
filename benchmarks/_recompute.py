"""Proposed replacement for per-frame ``torch.utils.checkpoint`` in ase_bptt/relax/relaxer.py (issue 6).

Measured by ``bench_bptt.py`` (variants ``recompute_frames`` and ``recompute_segments``); kept here,
in the benchmarks, until the relaxer's owner moves it into the package.

Drop-in for relaxer.py: add ``_RecomputedFrame`` and ``recomputed_frame`` and, in ``rollout``, replace

    positions, state, active, converged, n_frames = checkpoint(fn, *args, use_reentrant=False)

by

    positions, state, active, converged, n_frames = recomputed_frame(fn, *args, params=params)

with ``params = trainable_parameters(model, step_rule)`` computed once before the loop. ``fn`` is
the existing ``functools.partial(_frame, model, batch, step_rule, k, tol, fmax)``; ``args`` the
existing ``(positions, state, active, converged, n_frames, noise)``.

Measured (benchmarks/bench_bptt.py, variant ``recompute_frames``, same Function): k=75, 63 atoms:
4.2% of naive peak memory, 1.41x naive time (package's checkpoint: 24.5%, 2.10x); 215 atoms: 3.2%,
1.31x (checkpoint: 12.1%, 2.05x). The relax test suite passes with rollout replaced by
:func:`rollout` below (see the README's Performance section).
"""

from __future__ import annotations

from itertools import chain
from typing import Callable

import torch


def trainable_parameters(*modules: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """Parameters that need gradients, in a fixed order (the explicit inputs of the Function)."""
    seen: set[int] = set()
    out = []
    for p in chain.from_iterable(m.parameters() for m in modules):
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return tuple(out)


class _RecomputedFrame(torch.autograd.Function):
    """One frame run under ``no_grad`` in forward and recomputed with grad in backward.

    Saves only the frame's inputs. Trainable parameters are explicit inputs so their gradients
    reach ``.grad`` (and DDP hooks) as usual; the RNG state is replayed so dropout matches.
    """

    @staticmethod
    def forward(ctx, run, keys, out_keys, positions, active, converged, n_frames, noise, n_state, *tensors):  # noqa: D102
        state_in = tensors[:n_state]
        ctx.run, ctx.keys, ctx.params = run, keys, tensors[n_state:]
        ctx.rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(positions.device) if positions.is_cuda else None
        with torch.no_grad():
            pos, state, a, c, n = run(positions, dict(zip(keys, state_in)), active, converged, n_frames, noise)
        ctx.out_keys = tuple(state)
        out_keys[:] = ctx.out_keys
        inputs = (positions, active, converged, n_frames, *state_in)
        # An output that is an input object (e.g. ``converged`` when nothing stops) is cloned:
        # autograd Functions must not hand an input back as a fresh output.
        outs = [t.clone() if any(t is i for i in inputs) else t for t in (pos, a, c, n, *(state[k] for k in ctx.out_keys))]
        ctx.save_for_backward(positions, active, converged, n_frames, noise, *state_in)
        ctx.mark_non_differentiable(outs[1], outs[2], outs[3], *[t for t in outs[4:] if not t.is_floating_point()])
        return tuple(outs)

    @staticmethod
    def backward(ctx, grad_pos, _ga, _gc, _gn, *grad_state):  # noqa: D102
        positions, active, converged, n_frames, noise, *state_in = ctx.saved_tensors
        devices = [positions.device] if positions.is_cuda else []
        with torch.enable_grad(), torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, positions.device)
            pos = positions.detach().requires_grad_(ctx.needs_input_grad[3])
            state = {k: (v.detach().requires_grad_(ctx.needs_input_grad[9 + i]) if v.is_floating_point() else v)
                     for i, (k, v) in enumerate(zip(ctx.keys, state_in))}
            out_pos, out_state, *_ = ctx.run(pos, state, active, converged, n_frames, noise)
        outputs, grads = [], []
        for out, g in zip([out_pos] + [out_state[k] for k in ctx.out_keys], (grad_pos, *grad_state)):
            if g is not None and out.requires_grad:
                outputs.append(out)
                grads.append(g)
        inputs = [pos, *state.values(), *ctx.params]
        wanted = [t for t in inputs if t.requires_grad]
        got = iter(torch.autograd.grad(outputs, wanted, grads, allow_unused=True) if outputs and wanted
                   else [None] * len(wanted))
        result = [next(got) if t.requires_grad else None for t in inputs]
        return (None, None, None, result[0], None, None, None, None, None, *result[1:])


def recomputed_frame(fn: Callable, positions, state, active, converged, n_frames, noise, *, params):
    """``fn(positions, state, active, converged, n_frames, noise)`` with its activations recomputed in backward."""
    keys = tuple(state)
    out_keys: list[str] = []
    out = _RecomputedFrame.apply(fn, keys, out_keys, positions, active, converged, n_frames, noise, len(keys),
                                 *state.values(), *params)
    positions, active, converged, n_frames = out[:4]
    return positions, dict(zip(out_keys, out[4:])), active, converged, n_frames


# ----------------------------------------------------------------------------- segments
# The variant that meets the issue-6 goal with margin on the 2-core machine: one recomputed node per
# round(sqrt(max_steps)) frames (benchmarks/bench_bptt.py ``recompute_segments``: 13.7-14.1% of
# naive memory, 1.23-1.33x time at k=75; per-frame: 3-4%, 1.31-1.56x). Stopping is unchanged (a
# stopped structure is frozen by the masks inside ``_frame``); the loop only checks "anything still
# moving?" once per segment, so after the last structure stops up to segment-1 frames run in which
# nothing moves (same positions, same n_frames).


def _frames(model, batch, step_rule, start, stop, tol, fmax, positions, state, active, converged, n_frames, noise):
    """Frames ``start..stop-1``; ``noise`` is None or ``(stop - start, B, N, 3)`` drawn outside."""
    from ase_bptt.relax.relaxer import _frame

    for i, k in enumerate(range(start, stop)):
        positions, state, active, converged, n_frames = _frame(
            model, batch, step_rule, k, tol, fmax, positions, state, active, converged, n_frames,
            None if noise is None else noise[i])
    return positions, state, active, converged, n_frames


def rollout(model, batch, step_rule, *, tol=1e-3, max_steps=75, fmax=None, checkpoint_frames=False,
            generator=None, sync_active=None):
    """``ase_bptt.relax.relaxer.rollout`` with recomputed segments when ``checkpoint_frames``.

    ``checkpoint_frames``: False, True (segments of round(sqrt(max_steps)) frames) or an int (frames
    per segment; 1 = per frame). Without grad (or False) it is the package's loop, frame by frame.
    """
    import functools
    import math

    from ase_bptt.relax.relaxer import RolloutResult, _draw_noise, _frame, _LaggedFlag, model_dtype_device

    dtype, device = model_dtype_device(model)
    batch = batch.to(device, dtype)
    positions = batch.positions
    b = len(batch)
    state = step_rule.init_state(batch, positions)
    active = torch.ones(b, dtype=torch.bool, device=device)
    converged = torch.zeros(b, dtype=torch.bool, device=device)
    n_frames = torch.zeros(b, dtype=torch.long, device=device)
    flag_reader = _LaggedFlag(positions.device)
    recompute = bool(checkpoint_frames) and torch.is_grad_enabled()
    if recompute:
        segment = max(1, round(math.sqrt(max_steps))) if checkpoint_frames is True else int(checkpoint_frames)
        params = trainable_parameters(model, step_rule)
    else:
        segment = 1
    start = 0
    while start < max_steps:
        stop = min(max_steps, start + segment)
        if recompute:
            noises = [_draw_noise(step_rule, positions, generator) for _ in range(start, stop)]
            noise = None if noises[0] is None else torch.stack(noises)
            run = functools.partial(_frames, model, batch, step_rule, start, stop, tol, fmax)
            positions, state, active, converged, n_frames = recomputed_frame(
                run, positions, state, active, converged, n_frames, noise, params=params)
        else:
            noise = _draw_noise(step_rule, positions, generator)
            positions, state, active, converged, n_frames = _frame(
                model, batch, step_rule, start, tol, fmax, positions, state, active, converged, n_frames, noise)
        start = stop
        flag = active.any()
        if sync_active is not None:
            flag = sync_active(flag.to(dtype)) > 0
        if not flag_reader.any_moving(flag):
            break
    return RolloutResult(positions, n_frames, converged)
