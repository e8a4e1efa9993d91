"""Device selection and the dtype policy, one place for training and inference alike.

Inference weights: bf16 on a CUDA device that supports it (fp16 on one that does not), fp32
elsewhere unless a dtype is asked for (`--dtype`). Training precision (autocast): bf16 on CUDA
(fp16 without bf16 support), bf16 on CPUs with native bf16, else fp32.
"""
from __future__ import annotations

import contextlib
import os

import torch

from lmforge.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda", "mps")


def sum_dtype(device: torch.device) -> torch.dtype:
    """The dtype to accumulate losses and metrics in on `device`: float64, or float32 on MPS, which has none."""
    return torch.float32 if device.type == "mps" else torch.float64


class DeviceError(UserError):
    """A device that was asked for and is not there; the message names the setting."""


def pick_device(pref: str = "auto", local_rank: int = 0, key: str = "--device") -> torch.device:
    """auto: CUDA, then Apple MPS, then CPU; `key` is the setting named when the device is missing."""
    if pref not in DEVICES:
        raise DeviceError(f"{key} {pref!r}: expected one of {', '.join(DEVICES)}")
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DeviceError(f"{key}=cuda but no CUDA device is visible")
        return torch.device("cuda", local_rank)
    if pref == "mps" or (pref == "auto" and torch.backends.mps.is_available()):
        if not torch.backends.mps.is_available():
            raise DeviceError(f"{key}=mps but no Apple MPS device is available")
        return torch.device("mps")
    return torch.device("cpu")


def inference_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype:
    """The weights dtype for inference on `device`: `dtype` when given, else the policy above."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise DeviceError(f"dtype {dtype!r}: expected auto or one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls on this CPU (AVX512-BF16 or AMX)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(precision: str, device: torch.device) -> str:
    """Training precision for `auto`: bf16 on CUDA when supported (else fp16), bf16 on CPUs with native bf16,
    else fp32; any other value as given."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_bf16():
        return "bf16"
    return "fp32"


def device_info() -> dict:
    """Devices and threads this process sees (`lmforge info`)."""
    return {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(),
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cpu_bf16": cpu_has_bf16()}


def autocast_for(precision: str, device: torch.device):
    """The autocast context for a resolved precision; fp32 runs without one."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
