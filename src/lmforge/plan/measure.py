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
                update(engine, state, loss, tc.grad_clip)
                state.step += 1
            tracker.__exit__(None, None, None)
        return {"peak": tracker.peak, "start": tracker.start, "rank": rt.rank, "precision": engine.precision}
    finally:
        shutdown(rt)


def lm_batch(vocab_size: int, seq_len: int):
    """make_batch for causal_lm: random token windows (what the memory depends on is only their shape)."""
    def make(n: int):
        x = torch.randint(0, vocab_size, (n, seq_len + 1))
        return x[:, :-1].contiguous(), x[:, 1:].contiguous()
    return make


def sft_batch(vocab_size: int, seq_len: int):
    """make_batch for sft_loss: full rows, every position a target, positions 0..seq_len-1 (one example a row)."""
    def make(n: int):
        x = torch.randint(0, vocab_size, (n, seq_len + 1))
        return {"input_ids": x[:, :-1].contiguous(), "targets": x[:, 1:].contiguous(),
                "position_ids": torch.arange(seq_len).expand(n, seq_len).contiguous()}
    return make


def measure_pretrain(model_cfg, tc, seed: int = 0) -> dict:
    """The tracked peak of pretraining `model_cfg` (a ModelConfig with vocab_size set) per `tc`."""
    from lmforge.model.build import build_model
    from lmforge.train.objectives import causal_lm

    built = build_model(model_cfg, seed)
    return measure_steps(built.module, built.blocks, causal_lm, lm_batch(model_cfg.vocab_size, model_cfg.max_seq_len),
                         tc)


def measure_finetune(cfg, seq_len: int) -> dict:
    """The tracked peak of fine-tuning per `cfg` (a FinetuneConfig) on rows of `seq_len` tokens."""
    from lmforge.device import resolve_precision
    from lmforge.train.distributed import init_runtime
    from lmforge.train.finetune import build_model, decoder_layers, sft_loss

    rt = init_runtime(cfg.train.device, "none", cfg.train.threads)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, resolve_precision(cfg.train.precision, rt.device), rt.device)
    return measure_steps(model, decoder_layers(model), sft_loss, sft_batch(model.config.vocab_size, seq_len), cfg.train)


def _rank_main(rank: int, world: int, port: int, model_cfg: dict, train_cfg: dict, results) -> None:
    """One process of `measure_pretrain_ranks` (a spawn target, so it is importable)."""
    from lmforge.model.config import ModelConfig
    from lmforge.train.config import TrainConfig

    spawn_env(rank, world, port)
    results.put(measure_pretrain(ModelConfig(**model_cfg), TrainConfig(**train_cfg)))


def measure_pretrain_ranks(model_cfg, tc, world: int = 2, timeout: float = 300) -> list[dict]:
    """measure_pretrain in `world` processes (torchrun's environment, gloo) for train.parallel=ddp|fsdp; per rank."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, model_cfg.model_dump(), tc.model_dump(), results))
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        out = [results.get(timeout=timeout) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return sorted(out, key=lambda r: r["rank"])
