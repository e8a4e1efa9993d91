"""Run metrics: metrics.jsonl (DESIGN.md format), TensorBoard and W&B when asked, one console progress bar."""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

from lmforge.device import sum_dtype

# Dense bf16 peak FLOP/s per device, for MFU. Unknown devices (CPUs) report no MFU.
PEAK_BF16_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12, "L40S": 362e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "B200": 2250e12,
}


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def memory_gb(device: torch.device) -> float:
    """Peak memory: CUDA allocator peak on GPUs, peak RSS of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


class GpuMonitor:
    """NVML readings of this process's CUDA device for train lines: memory in use (the whole device, as
    nvidia-smi shows it, unlike mem_gb's allocator peak) and utilisation (percent of time a kernel ran)."""

    def __init__(self, nvml, handle):
        self.nvml, self.handle = nvml, handle

    def read(self) -> dict:
        try:
            mem = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
            util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle)
        except self.nvml.NVMLError:  # a transient driver error costs one line's readings, not the run
            return {}
        return {"gpu_mem_gb": mem.used / 1e9, "gpu_util": float(util.gpu)}


def gpu_monitor() -> GpuMonitor | str | None:
    """A GpuMonitor when this process trains on CUDA (the engine has initialised it) and pynvml (the
    nvidia-ml-py package) imports; the reason NVML failed as a string; None on CPU or without pynvml."""
    if not torch.cuda.is_initialized():
        return None
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        index = torch.cuda.current_device()
        visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        entry = visible[index] if index < len(visible) else str(index)  # CUDA's index -> NVML's device
        handle = (pynvml.nvmlDeviceGetHandleByIndex(int(entry)) if entry.isdigit()
                  else pynvml.nvmlDeviceGetHandleByUUID(entry))
        return GpuMonitor(pynvml, handle)
    except pynvml.NVMLError as e:
        return f"NVML: {e}"


class StepMetrics:
    """Weighted means of an objective's extra numbers since they were last taken, per mode (train or eval)."""

    def __init__(self):
        self._sums: dict[tuple[str, str], list[float]] = {}

    def add(self, mode: str, values: dict, weight: float = 1.0) -> None:
        """Add `values` (floats or 0-d tensors) with `weight` (e.g. the pairs they were measured on).

        Tensors are summed where they are and read only by `take`, so an objective's numbers cost no host sync per
        micro-batch.
        """
        for key, value in values.items():
            acc = self._sums.setdefault((mode, key), [0.0, 0.0])
            if isinstance(value, torch.Tensor):
                value = value.detach().to(sum_dtype(value.device))
            acc[0] = acc[0] + value * weight
            acc[1] += weight

    def take(self, mode: str) -> dict[str, float]:
        """The means added in `mode` since the last take, and forget them."""
        out = {k: float(s) / max(n, 1e-12) for (m, k), (s, n) in self._sums.items() if m == mode}
        self._sums = {key: v for key, v in self._sums.items() if key[0] != mode}
        return out


class MetricsLogger:
    """Writes on rank 0 only; other ranks get a logger whose calls do nothing."""

    def __init__(self, out_dir: Path, enabled: bool, max_steps: int, start_step: int, tensorboard: bool,
                 wandb: bool, wandb_project: str, config: dict, progress: bool):
        self.enabled = enabled
        self.tb = self.wandb = self.bar = None
        if not enabled:
            return
        self.file = open(out_dir / "metrics.jsonl", "a", buffering=1)
        self.gpu = gpu_monitor()
        if isinstance(self.gpu, str):
            self.event(start_step, "nvml_unavailable", f"{self.gpu}; train lines carry no gpu_mem_gb/gpu_util")
            self.gpu = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                self.event(start_step, "tensorboard_unavailable", "pip install tensorboard to log there")
        if wandb:
            import wandb as wb
            self.wandb = wb.init(project=wandb_project, dir=str(out_dir), config=config, resume="allow")
        if progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)

    def _write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")

    def train(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.gpu:
            record.update(self.gpu.read())
        self._write(record)
        step = record["step"]
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                if self.tb:
                    self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb:
            self.wandb.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)
        if self.bar:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['tokens_per_sec']:.0f}", refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.enabled and self.bar:
            self.bar.update(n)

    def eval(self, step: int, val_loss: float, val_ppl: float, elapsed_s: float, extra: dict | None = None) -> None:
        """One eval line; `extra` holds an objective's own held-out numbers (accuracy, margin, ...)."""
        if not self.enabled:
            return
        extra = extra or {}
        self._write({"step": step, "val_loss": val_loss, "val_ppl": val_ppl, "elapsed_s": elapsed_s,
                     **{f"val_{k}": v for k, v in extra.items()}})
        if self.tb:
            self.tb.add_scalar("eval/val_loss", val_loss, step)
            for k, v in extra.items():
                self.tb.add_scalar(f"eval/{k}", v, step)
        if self.wandb:
            self.wandb.log({"eval/val_loss": val_loss, "eval/val_ppl": val_ppl,
                            **{f"eval/{k}": v for k, v in extra.items()}}, step=step)
        shown = "".join(f", {k} {v:.4f}" for k, v in extra.items())
        self.say(f"step {step}: val loss {val_loss:.4f}, val ppl {val_ppl:.2f}{shown}")

    def event(self, step: int, event: str, detail: str) -> None:
        if not self.enabled:
            return
        self._write({"step": step, "event": event, "detail": detail, "time": time.time()})
        self.say(f"[{event}] step {step}: {detail}")

    def say(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar:
            self.bar.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
        self.file.close()
