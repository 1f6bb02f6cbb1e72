"""DDP helpers: run pretrain and finetune unchanged under ``torchrun``.

``torchrun --nproc-per-node N`` sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``; :func:`init_distributed` reads them and starts a process group
(gloo on CPU, nccl on CUDA). Training shards every global batch by rank and
sums gradients with one all-reduce after backward instead of wrapping the model
in ``DistributedDataParallel``: BPTT backpropagates through a rollout whose
length is decided at run time, and a manual all-reduce after the whole backward
pass is simpler, deterministic and cannot hang on an unused parameter. Losses
are normalised by the *global* count (atoms or structures), so the summed
gradient equals the single-process gradient on the same global batch.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ase_bptt.device import check_device

__all__ = ["DistContext", "init_distributed", "resolve_device", "shard", "shard_chunks"]


def resolve_device(device: str | torch.device | None, *, local_rank: int = 0) -> torch.device:
    """The device to train on.

    Args:
        device: "cpu", "cuda", "cuda:1", ... or None for "cuda when available".
            Under torchrun a bare "cuda" means the process's own GPU
            (``cuda:LOCAL_RANK``).
        local_rank: this process's rank on its node.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = check_device(device)  # DeviceError, a ValueError
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return device


def shard_chunks(index: torch.Tensor, ctx: DistContext, size: int) -> list[torch.Tensor]:
    """This rank's share of ``index`` in chunks of at most ``size``; none when the share is empty (a split
    with fewer items than ranks), where ``torch.split`` would give one empty chunk."""
    return [chunk for chunk in torch.split(shard(index, ctx.rank, ctx.world_size), size) if len(chunk)]


def shard(items: Sequence | torch.Tensor, rank: int, world_size: int):
    """This rank's contiguous share of one global batch (shares differ by at most one)."""
    n = len(items)
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return items[start:stop]


@dataclass
class DistContext:
    """Where this process stands in a (possibly single-process) run.

    Attributes:
        world_size: number of processes (1 without torchrun).
        rank: this process's global rank.
        local_rank: rank on this node (picks the GPU).
        device: the device this process trains on.
        initialized_here: True when :func:`init_distributed` started the
            process group (it is destroyed when the process exits).
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) writes files and shows progress."""
        return self.rank == 0

    # ------------------------------------------------------------ collectives
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks (returns a new tensor; identity for one process)."""
        if not self.enabled:
            return tensor
        t = tensor.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Maximum of ``tensor`` over ranks."""
        if not self.enabled:
            return tensor
        t = tensor.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is True on any rank (every rank gets the same answer)."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.all_reduce_max(t).item() > 0)

    def sync_active(self, active: torch.Tensor) -> torch.Tensor:
        """Rollout hook: 1.0 when a structure still moves on any rank.

        Passed as ``rollout(..., sync_active=ctx.sync_active)`` so every rank
        takes the same number of frames in one training step.
        """
        return self.all_reduce_max(active.to(torch.float32).reshape(()))

    def sync_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Sum gradients over ranks in place with one flattened all-reduce.

        A parameter whose gradient is None on every rank stays None (so the
        optimiser skips it exactly as a single process would); one that has a
        gradient on some rank gets the sum, with zeros for ranks that had none.
        """
        if not self.enabled:
            return
        params = [p for p in parameters if p.requires_grad]
        if not params:
            return
        has = torch.tensor([0.0 if p.grad is None else 1.0 for p in params], device=self.device)
        flat = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params])
        has = self.all_reduce_max(has)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, h in zip(params, has.tolist()):
            n = p.numel()
            if h > 0:
                p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank."""
        if not self.enabled:
            return
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=0)

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.enabled:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def close(self) -> None:
        """Wait for every rank; the process group itself lives until the process exits.

        Destroying and re-creating the default group within one process (e.g.
        finetune pretraining first) can hang in the re-initialisation, so the
        group started by :func:`init_distributed` is ended at exit instead.
        """
        if self.enabled and dist.is_initialized():
            self.barrier()


def init_distributed(device: str | torch.device | None = None) -> DistContext:
    """Read torchrun's environment and join (or start) the process group.

    Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) this is a plain
    single-process context. An already initialised default group (e.g. a test
    harness) is reused and left open.

    Args:
        device: as for :func:`resolve_device`.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if dist.is_available() and dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
        return DistContext(world_size, rank, local_rank, resolve_device(device, local_rank=local_rank), False)
    dev = resolve_device(device, local_rank=local_rank)
    if world_size <= 1:
        return DistContext(1, 0, 0, dev, False)
    if not dist.is_available():  # pragma: no cover - every supported torch build has it
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed.")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend=backend, world_size=world_size, rank=rank)
    atexit.register(_destroy)
    return DistContext(world_size, rank, local_rank, dev, True)


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
