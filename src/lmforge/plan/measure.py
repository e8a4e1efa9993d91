"""Measure what the memory planner estimates: the peak of live tensor memory over real training steps.

Why a tracker of our own: on CPU PyTorch keeps no allocator statistics (CUDA has `max_memory_allocated`), and the
process RSS mixes in the Python heap, libraries and freed-but-cached pages. `LiveTensorMemory` counts exactly the
bytes of tensor storages that are alive: those alive when it starts (found through the garbage collector:
parameters, gradients, optimizer states) plus every storage an operator creates while it is active (activations,
autograd's saved tensors, autocast's weight copies, gradients, collective buffers), each until it is freed, and
its size now (FSDP resizes the storage of a gathered parameter to 0 to free it). The peak is taken between
operators, as the planner's formulas count tensors, not a kernel's scratch space.
"""
from __future__ import annotations

import gc
import os
import warnings
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorMemory(TorchDispatchMode):
    """Peak bytes of live tensor storages while active (`peak`), and the bytes live at entry (`start`).

    A storage's size is read again whenever an operator touches it; `rescan=True` also reads every live storage's
    size after each operator, which FSDP needs (it frees a gathered parameter by resizing its storage, no operator).
    """

    def __init__(self, rescan: bool = False):
        super().__init__()
        self.rescan = rescan
        self.sizes: dict[int, tuple[weakref.ref, int]] = {}
        self.current = self.peak = self.start = 0

    def _forget(self, key: int) -> None:
        _, size = self.sizes.pop(key, (None, 0))
        self.current -= size

    def _add(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        local = getattr(t, "_local_tensor", None)  # a DTensor's shard
        if local is not None:
            t = local
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a wrapper subclass without storage of its own
            return
        self._update(id(storage), storage)

    def _update(self, key: int, storage) -> None:
        size = storage.nbytes()
        if key in self.sizes:
            ref, old = self.sizes[key]
            self.sizes[key] = (ref, size)
            self.current += size - old
        else:
            self.sizes[key] = (weakref.ref(storage, lambda _, k=key: self._forget(k)), size)
            self.current += size

    def __enter__(self):
        gc.collect()
        seen: set[int] = set()  # storages that share memory (two storage objects of one allocation) count once
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # isinstance() on deprecated torch objects warns
            tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
        for t in tensors:
            try:
                ptr = (getattr(t, "_local_tensor", None) or t).untyped_storage().data_ptr()
            except (RuntimeError, NotImplementedError):
                continue
            if ptr == 0 or ptr not in seen:
                seen.add(ptr)
                self._add(t)
        self.start = self.peak = self.current
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten((out, args, kwargs))[0]:
            self._add(t)
        if self.rescan:
            for key, (ref, _) in list(self.sizes.items()):
                storage = ref()
                if storage is not None:
                    self._update(key, storage)
        self.peak = max(self.peak, self.current)
        return out


def spawn_env(rank: int, world: int, port: int) -> None:
    """The environment torchrun would give process `rank` of `world` on this machine."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def measure_steps(model: torch.nn.Module, blocks: list, objective, make_batch, tc, steps: int = 3) -> dict:
    """Train `steps` optimizer steps with the engine (build_engine, forward_backward, update) and track steps 2 on.

    Step 1 runs untracked so the optimizer states exist, as in every later step: the peak is a steady step's.
    `make_batch(micro_batch_size)` gives one micro-batch. Returns {peak, start} in bytes, and this process's rank.
    """
    import tempfile
    from pathlib import Path

    from lmforge.device import resolve_precision
    from lmforge.train.config import GuardConfig
    from lmforge.train.distributed import init_runtime, shutdown
    from lmforge.train.job import Job
    from lmforge.train.metrics import MetricsLogger
    from lmforge.train.state import TrainState, build_engine
    from lmforge.train.step import forward_backward, update

    guards = GuardConfig()
    rt = init_runtime(tc.device, tc.parallel, tc.threads)
    try:
        engine = build_engine(model, blocks, tc, guards, rt, resolve_precision(tc.precision, rt.device))
        batches = [[make_batch(tc.micro_batch_size) for _ in range(tc.grad_accum)] for _ in range(steps)]
        job = Job(model=engine.model, objective=objective, train_batches=lambda step, *_: batches[step],
                  eval_batches=None, save_model=lambda *_: None, load_model=lambda *_: {}, tokens_per_step=1)
        state = TrainState(micro_batch_size=tc.micro_batch_size, grad_accum=tc.grad_accum)
        engine.model.train()
        with tempfile.TemporaryDirectory() as tmp:
            logger = MetricsLogger(Path(tmp), False, steps, 0, False, False, "", {}, False)
            tracker = LiveTensorMemory(rescan=tc.parallel == "fsdp")
            for step in range(steps):
                if step == 1:
                    tracker.__enter__()
                loss, _ = forward_backward(job, engine, state, rt, guards, logger)
                update(engine, state, loss, tc.grad_clip, logger)
                state.step += 1
            tracker.__exit__(None, None, None)
        return {"peak": tracker.peak, "start": tracker.start, "rank": rt.rank, "precision": engine.precision}
    finally:
        shutdown(rt)
