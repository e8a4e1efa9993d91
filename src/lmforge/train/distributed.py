"""Devices and processes: one process alone, or torchrun's N processes with DDP, FSDP2 or HSDP (FSDP2 on a 2-D mesh)."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from lmforge.config import ConfigError
from lmforge.device import pick_device


@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_runtime(device_pref: str, parallel: str, threads: int | None = None) -> Runtime:
    """Join torchrun's process group when its environment is there (NCCL on CUDA plus gloo for CPU tensors; gloo otherwise).

    CPU threads: `threads` if given, else the cores split between the processes on this machine.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local, key="train.device")
    if world > 1:
        if parallel == "none":
            raise RuntimeError(f"started with {world} processes but train.parallel=none; set train.parallel=ddp or fsdp (or hsdp)")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            # On CUDA gloo joins NCCL for CPU tensors: train.cpu_offload's gradient norm and optimizer state live there.
            dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    if threads:
        torch.set_num_threads(threads)
    elif device.type == "cpu" and world > 1:
        torch.set_num_threads(max(1, torch.get_num_threads() // world))
    return Runtime(rank, world, local, device)


def wrap_model(model: nn.Module, rt: Runtime, parallel: str, blocks: list[nn.Module] | None,
               mp_dtype: torch.dtype | None, cpu_offload: bool = False, shard_degree: int | None = None,
               reshard_after_forward: bool = True) -> nn.Module:
    """DDP, or FSDP2 `fully_shard` per transformer block and then the root (HSDP: on a 2-D mesh); a no-op on one process.

    `cpu_offload` keeps the sharded parameters, their gradients and the optimizer step on the CPU (FSDP2's
    CPUOffloadPolicy, ZeRO-3-offload's equivalent); pinned host memory only where there is a CUDA device to copy to.
    """
    if not rt.distributed:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        # broadcast_buffers=False: the buffers (RoPE tables, causal mask) are the same constants on every
        # rank, and a buffer broadcast in forward would make evaluation a collective (ranks hang when they
        # hold different numbers of validation batches).
        return DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                   broadcast_buffers=False)
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32) if mp_dtype else MixedPrecisionPolicy()
    # CPUOffloadPolicy's default pin_memory=True fails without an accelerator ("Cannot access accelerator device").
    offload = CPUOffloadPolicy(pin_memory=rt.device.type == "cuda") if cpu_offload else OffloadPolicy()
    mesh = hsdp_mesh(rt, shard_degree) if parallel == "hsdp" else None
    for block in blocks or []:
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=reshard_after_forward)
    return model


def hsdp_mesh(rt: Runtime, shard_degree: int | None):
    """HSDP's 2-D (replicate, shard) mesh: parameters sharded over `shard_degree` processes (default: one node's,
    LOCAL_WORLD_SIZE) and replicated over the world_size / shard_degree groups."""
    from torch.distributed.device_mesh import init_device_mesh
    shard = shard_degree or int(os.environ.get("LOCAL_WORLD_SIZE", rt.world_size))
    if rt.world_size % shard:
        raise ConfigError(f"train.shard_degree {shard} does not divide the {rt.world_size} processes; "
                          f"use a divisor of {rt.world_size}")
    return init_device_mesh(rt.device.type, (rt.world_size // shard, shard), mesh_dim_names=("replicate", "shard"))


def no_grad_sync(model: nn.Module, last_micro: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if last_micro:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        return _restore_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _restore_sync(model):
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def all_reduce_sum(values: list[float], rt: Runtime) -> list[float]:
    """Sum host floats over ranks (float64 on the wire, so per-step sums do not pick up rounding).

    The tensor stays on the CPU: on CUDA runs it goes over the gloo half of the process group, so summing host
    numbers never waits for the GPU's queue.
    """
    if not rt.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def sum_on_device(value: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Sum a device tensor over ranks without reading it (on CUDA, NCCL queues it behind the step's kernels)."""
    if rt.distributed:
        dist.all_reduce(value)
    return value


def any_rank(flag: bool, rt: Runtime) -> bool:
    """Whether `flag` is set on any rank (a MAX all-reduce); every rank gets the same answer."""
    return all_reduce_max(int(flag), rt) > 0


def first_collective_micro(model: nn.Module, n_micro: int) -> int:
    """Index of a step's first micro-batch whose forward or backward runs a collective, for a wrapped model.

    Ranks must agree on an out-of-memory error before it: DDP's is the last (its backward all-reduces the
    gradients; the others run under no_sync), FSDP's the first (every forward all-gathers parameters).
    """
    return n_micro - 1 if hasattr(model, "no_sync") else 0


def all_reduce_max(value: int, rt: Runtime) -> int:
    """The maximum of an integer over ranks."""
    if not rt.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64)  # on the CPU, as in all_reduce_sum
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def eval_shard(eval_batches: Callable[[int, int, int], Iterable], micro_batch_size: int, rt: Runtime,
               parallel: str) -> Iterator[tuple[object, bool]]:
    """This rank's validation batches as (batch, counted) pairs.

    Under FSDP every forward is a collective (each block all-gathers its parameters), so all ranks must
    run as many forwards as the busiest one: a rank with fewer batches (e.g. 5 batches on 2 ranks, or
    1 batch on 2) repeats the first batch of the set and does not count it. DDP and one process need
    no padding: their batches come through as they are, all counted.
    """
    mine = eval_batches(micro_batch_size, rt.rank, rt.world_size)
    if not (rt.distributed and parallel in ("fsdp", "hsdp")):
        for batch in mine:
            yield batch, True
        return
    mine = list(mine)
    # Agree on the count before the first forward: a collective may not interleave with FSDP's all-gathers.
    missing = all_reduce_max(len(mine), rt) - len(mine)
    for batch in mine:
        yield batch, True
    if missing > 0:
        pad = next(iter(eval_batches(micro_batch_size, 0, 1)))
        for _ in range(missing):
            yield pad, False


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


def shutdown(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()
