"""Data-parallel training across processes (torchrun): one process per device, gradients averaged by DDP.

`torchrun --nproc_per_node N -m metalign train …` sets RANK, LOCAL_RANK and WORLD_SIZE; without them the run is a
single process. CUDA runs use NCCL, one GPU per local rank; CPU runs use gloo (tests). Ranks draw different
episodes (the sampler is seeded by rank, docs/methods.md P-15); evaluation episodes are sharded over ranks and their sums all-reduced,
so every rank takes the same selection and early-stopping decisions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup(device: torch.device) -> Context:
    """Join the process group that torchrun describes in the environment (if any); pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Context(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Context(rank=rank, world=world, device=device)


def teardown(context: Context) -> None:
    if context.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_sum(tensor: torch.Tensor, context: Context) -> torch.Tensor:
    """Sum over ranks, in place (a no-op for a single process)."""
    if context.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather(value: object, context: Context) -> list[object]:
    """Every rank's `value`, in rank order."""
    if not context.distributed:
        return [value]
    out: list[object] = [None] * context.world
    dist.all_gather_object(out, value)
    return out


def barrier(context: Context) -> None:
    if context.distributed:
        dist.barrier()
