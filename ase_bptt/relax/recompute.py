"""Activation recomputation for BPTT rollouts: a custom autograd Function.

:func:`recompute` runs a piece of a rollout (one frame, or a segment of
frames) under ``torch.no_grad`` and keeps only its inputs; backward runs it
again with autograd on and backpropagates through that fresh graph. Memory
then grows with the number of segments (their inputs) instead of with every
activation of every frame.

Why not ``torch.utils.checkpoint``: its non-reentrant form sends every tensor
a frame saves (~70 per frame for the default ADAPT model) through Python
pack/unpack hooks and keeps each frame's autograd nodes alive until backward.
For a model this small that bookkeeping costs more than the recomputation
itself (measured in ``benchmarks/bench_bptt.py``: 2.0-2.3x naive time and
25% of naive memory at k = 75, against 1.3-1.4x and 14% here with
round(sqrt(k))-frame segments).

Trainable parameters are explicit inputs of the Function so their gradients
reach ``.grad`` as usual; gradients flow to those parameters and to the
floating-point inputs, not to other tensors a ``run`` captures. The global
(and, on CUDA, the device's) RNG state is saved before the forward run and
replayed in backward, so dropout draws the same masks. Not supported:
double backward (``create_graph=True``) through a recomputed segment.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import chain
from typing import Any

import torch

__all__ = ["recompute", "trainable_parameters", "segment_length"]


def segment_length(checkpoint_frames: bool | int, max_steps: int) -> int:
    """Frames per recomputed segment: True -> round(sqrt(max_steps)), an int -> itself, False -> 0 (off).

    Raises:
        ValueError: for a negative segment length.
    """
    if checkpoint_frames is False or checkpoint_frames is None:
        return 0
    if checkpoint_frames is True:
        return max(1, round(math.sqrt(max(max_steps, 1))))
    n = int(checkpoint_frames)
    if n < 0:
        raise ValueError(f"checkpoint_frames must be True, False or a number of frames >= 1, got {checkpoint_frames}.")
    return n


def trainable_parameters(*modules: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """Parameters of ``modules`` that need gradients, each once, in a fixed order."""
    seen: set[int] = set()
    out = []
    for p in chain.from_iterable(m.parameters() for m in modules):
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return tuple(out)


class _Recomputed(torch.autograd.Function):
    """``run(*inputs)`` under no_grad in forward, recomputed with grad in backward."""

    @staticmethod
    def forward(ctx, run, n_inputs, *tensors):  # noqa: D102
        inputs = tensors[:n_inputs]
        ctx.run, ctx.n_inputs = run, n_inputs
        ctx.params = tensors[n_inputs:]
        ctx.rng = torch.get_rng_state()
        device = next((t.device for t in inputs if t is not None), torch.device("cpu"))
        ctx.cuda_device = device if device.type == "cuda" else None
        ctx.cuda_rng = torch.cuda.get_rng_state(device) if ctx.cuda_device is not None else None
        with torch.no_grad():
            outs = run(*inputs)
        # An output that is an input object (a flag nothing changed) is cloned: a Function
        # must not hand an input back as its output. None outputs pass through as None.
        outs = tuple(o.clone() if o is not None and any(o is i for i in tensors) else o for o in outs)
        ctx.save_for_backward(*inputs)
        ctx.mark_non_differentiable(*[o for o in outs if o is not None and not o.is_floating_point()])
        return outs

    @staticmethod
    def backward(ctx, *grad_outputs):  # noqa: D102
        saved = ctx.saved_tensors
        devices = [ctx.cuda_device] if ctx.cuda_device is not None else []
        with torch.enable_grad(), torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.cuda_device)
            inputs = [
                t.detach().requires_grad_(ctx.needs_input_grad[2 + i]) if t is not None and t.is_floating_point() else t
                for i, t in enumerate(saved)
            ]
            outs = ctx.run(*inputs)
        outputs, grads = [], []
        for out, g in zip(outs, grad_outputs):
            if out is not None and g is not None and out.requires_grad:
                outputs.append(out)
                grads.append(g)
        candidates = [*inputs, *ctx.params]
        wanted = [t for t in candidates if t is not None and t.requires_grad]
        got = iter(
            torch.autograd.grad(outputs, wanted, grads, allow_unused=True)
            if outputs and wanted
            else [None] * len(wanted)
        )
        result = [next(got) if t is not None and t.requires_grad else None for t in candidates]
        return (None, None, *result)


def recompute(
    run: Callable[..., Sequence[torch.Tensor | None]], *inputs: torch.Tensor | None, params: Sequence[torch.Tensor]
) -> tuple[Any, ...]:
    """``run(*inputs)`` with its activations dropped after forward and recomputed in backward.

    Args:
        run: a function of ``inputs`` returning a tuple of tensors (or None). It
            must be deterministic given the inputs and the RNG state (noise is
            passed in as an input, drawn outside).
        inputs: tensors (or None); floating ones receive gradients when they require them.
        params: the trainable parameters ``run`` uses (see :func:`trainable_parameters`).

    Returns:
        ``run``'s outputs (tensors, or None where ``run`` gave None); integer
        and bool outputs are non-differentiable.
    """
    return tuple(_Recomputed.apply(run, len(inputs), *inputs, *params))
