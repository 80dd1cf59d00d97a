"""Batches across processes started by torchrun or `accelerate launch`: each job renders once, on one rank.

No scheduler of our own: the launcher starts the processes and sets RANK, WORLD_SIZE, LOCAL_RANK
(and MASTER_ADDR/PORT); torch.distributed (NCCL on CUDA, gloo on the CPU) carries the few
messages a batch needs.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env(env: dict[str, str] | None = None) -> World:
    """The process's place in a torchrun / accelerate launch (one process: rank 0 of 1)."""
    env = os.environ if env is None else env
    return World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def split_jobs(count: int, world_size: int, rank: int) -> list[int]:
    """The job indices rank `rank` renders: round-robin, so ranks get equal shares (±1) and the
    split depends only on the job count and the world size. Every index goes to exactly one rank."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    return list(range(rank, count, world_size))


def start(world: World) -> None:
    """Join the process group (NCCL with CUDA, else gloo)."""
    if world.distributed and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(world.local_rank)
        torch.distributed.init_process_group(backend=backend)


def barrier(world: World) -> None:
    """Wait until every rank got here."""
    if world.distributed:
        torch.distributed.barrier()


def stop(world: World) -> None:
    """Leave the process group together: a rank that tears down while another still talks makes
    gloo abort the other."""
    if world.distributed and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def leave(code: int) -> None:
    """End a launched process now, with `code`. Interpreter teardown after a gloo process group
    sometimes aborts ("terminate called without an active exception", SIGABRT) once the work is
    done and written; the launcher would then report a failed rank. All output is flushed first."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def share_from_main(world: World, value: Any) -> Any:
    """Rank 0's `value` on every rank (e.g. the batch's random seeds, drawn once)."""
    if not world.distributed:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather(world: World, value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank (after all ranks got here: a barrier)."""
    if not world.distributed:
        return [value]
    values: list[Any] = [None] * world.size
    torch.distributed.all_gather_object(values, value)
    return values
