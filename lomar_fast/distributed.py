"""Process start and the few collectives the training loop needs.

Works under the ``deepspeed`` launcher, ``torchrun`` and a plain one-process ``python`` start (a world
of one, still with a process group so every code path is the same).
"""
from __future__ import annotations

import os
import random
import re
import socket

import numpy as np
import torch

from lomar_fast.errors import ConfigError


def free_port() -> int:
    """A TCP port that is free on this host right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(requested: str | None) -> torch.device:
    """``cuda`` (this rank's GPU, from LOCAL_RANK) when available or asked for, else ``cpu``."""
    if requested == "cpu" or (requested is None and not torch.cuda.is_available()):
        return torch.device("cpu")
    if requested is not None and not re.fullmatch(r"cuda(:\d+)?", requested):
        raise ConfigError(f"--device {requested} is not a device this project runs on; pass cpu or cuda")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {requested} asked for a GPU but torch sees none; pass --device cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def init_distributed(device: torch.device) -> tuple[int, int, int]:
    """Start torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU); returns (rank, world, local_rank)."""
    import deepspeed

    if "WORLD_SIZE" not in os.environ:  # plain python: a world of one, on a port nobody holds (not a stale MASTER_PORT)
        # DeepSpeed places the engine on cuda:LOCAL_RANK: the GPU this one process was given
        local = str(device.index or 0) if device.type == "cuda" else "0"
        os.environ.update(RANK="0", LOCAL_RANK=local, WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
        if device.type != "cuda":
            release_cpu_shm_name()
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def cpu_shm_path(rank: int) -> str:
    """The /dev/shm file DeepSpeed's CPU communication op creates for ``rank`` (its allreduce workspace, 66 MiB),
    named after the user id and MASTER_ADDR / MASTER_PORT."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_cpu_shm_name() -> None:
    """Unlink this rank's shared-memory workspace name once every rank has mapped every workspace.

    DeepSpeed's CPU op (0.19) creates one /dev/shm file per rank and process and never unlinks it, so each CPU
    run left 66 MiB of RAM per rank in /dev/shm until the machine filled up. The mappings stay valid after the
    unlink; the name is only needed while the ranks open each other's workspace inside init, which has returned
    on every rank after the barrier."""
    torch.distributed.barrier()
    try:
        os.unlink(cpu_shm_path(torch.distributed.get_rank()))
    except FileNotFoundError:  # another DeepSpeed version or no shm op: nothing to release
        pass


def shutdown_distributed() -> None:
    """Take the process group down before the interpreter's exit, once every rank has reached this point.

    Left to the exit, the process group's gloo worker threads can still be releasing a finished collective's
    tensors while the interpreter finalizes; a thread that then needs the GIL is ended by Python, and the C++
    runtime aborts the process ("terminate called without an active exception", exit -6), which makes the
    ``deepspeed`` launcher kill the other ranks, whatever they were still writing. Under torch 2.11, 9 of 30
    2-rank CPU runs of ``tests/engine_modes_ranks.py`` ended so, and 8 of 20 of a 2-rank stop on a NaN loss
    (none of 27 and none of 20 with this teardown). On GPUs, NCCL warned at every exit that
    ``destroy_process_group()`` was not called (this teardown has not run on a GPU yet). The barrier also keeps a
    rank from leaving while another still works."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    import deepspeed.comm.comm as ds_comm

    barrier()
    if ds_comm.cdb is not None:
        ds_comm.destroy_process_group()  # also drops DeepSpeed's cached groups
        ds_comm.cdb = None
    else:
        torch.distributed.destroy_process_group()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the process group, or (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place sum or max over ranks (a no-op in a world of one); returns ``t``."""
    if rank_world()[1] > 1:
        red = torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM
        torch.distributed.all_reduce(t, op=red)
    return t


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows in rank order (ranks may hold different row counts)."""
    _, world = rank_world()
    if world == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    torch.distributed.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    pad = x.new_zeros((max(sizes) - x.shape[0], *x.shape[1:]))
    buf = [x.new_zeros((max(sizes), *x.shape[1:])) for _ in range(world)]
    torch.distributed.all_gather(buf, torch.cat([x, pad]))
    return torch.cat([b[:s] for b, s in zip(buf, sizes)])


def barrier() -> None:
    if rank_world()[1] > 1:
        torch.distributed.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank."""
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def derived_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed mixed from ``seed`` and ``parts`` (splitmix64 steps): distinct parts give unrelated streams."""
    x = seed & 0xFFFFFFFFFFFFFFFF
    for p in (*parts, 0x5DEECE66D):
        x = (x + 0x9E3779B97F4A7C15 + (p & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x = z ^ (z >> 31)
    return x & 0x7FFFFFFFFFFFFFFF


def seed_shared(seed: int) -> None:
    """The same stream on every rank: for what must match across ranks (the initial weights)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def seed_rank(seed: int, rank: int, epoch: int) -> None:
    """This rank's own streams for epoch ``epoch`` (drop path, Mixup/CutMix, random erasing): they differ
    across ranks and are a function of (seed, rank, epoch), so a run resumed at an epoch boundary draws
    what the uninterrupted run drew."""
    s = derived_seed(seed, 1 + rank, epoch)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)
