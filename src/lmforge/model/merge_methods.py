"""The tensor arithmetic of model merging, one function per mergekit method, equal to mergekit's on the same input.

Each method takes one tensor per input model (the base, when the method has one, passed apart), the resolved
shared parameters and the per-model ones, and returns the merged tensor. The formulas, their dtypes and their
order of operations follow mergekit 0.1.5 (`merge_methods/linear.py`, `slerp.py`, `generalized_task_arithmetic.py`,
`model_stock.py`, `sparsify.py`), so a float32 merge agrees with `mergekit-yaml` to rounding.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

REQUIRED = object()  # a parameter without a default


@dataclass(frozen=True)
class MethodSpec:
    """A merge method: its function, its shared and per-model parameters (name -> (type, default)), its inputs."""
    fn: Callable
    shared: dict[str, tuple[type, object]]
    per_model: dict[str, tuple[type, object]] = field(default_factory=dict)
    base: bool = False  # needs base_model; per-model parameters then apply to the other models only
    min_inputs: int = 1
    max_inputs: int | None = None


# ---- sparsification (DARE, TIES, breadcrumbs, DELLA) ------------------------------------------------------------

def _rescaled(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool, eps: float = 1e-7) -> torch.Tensor:
    """`tensor * mask`, scaled back to the tensor's L1 norm when `rescale` (mergekit's DARE/DELLA rescaling)."""
    masked = tensor * mask
    if not rescale:
        return masked
    before, after = tensor.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def magnitude(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keep the `density` fraction of largest-magnitude entries (TIES).

    A full argsort, as mergekit does: selecting the k-th largest (kthvalue) is ~6x faster on an embedding matrix,
    but where magnitudes tie at the threshold (common in task vectors of quantization-derived models) only the
    same sort picks the same entries, and parity with mergekit is the point."""
    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return torch.zeros_like(tensor)
    k = max(1, int(density * tensor.numel()))
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype)
    mask[torch.argsort(tensor.abs().reshape(-1).float(), descending=True)[:k]] = 1
    return _rescaled(tensor, mask.reshape_as(tensor), rescale)


def magnitude_outliers(tensor: torch.Tensor, density: float, rescale: bool, gamma: float) -> torch.Tensor:
    """Drop the `gamma` fraction of largest entries, then the smallest, keeping `density` (Model Breadcrumbs)."""
    if density >= 1:
        return tensor
    n = tensor.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    mask = torch.zeros(n, dtype=tensor.dtype)
    mask[torch.sort(tensor.abs().reshape(-1).float()).indices[bottom:bottom + keep]] = 1
    return _rescaled(tensor, mask.reshape_as(tensor), rescale)


def bernoulli(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keep each entry with probability `density` (DARE); computed in float32 unless bfloat16."""
    if density >= 1:
        return tensor
    work = tensor.dtype if tensor.dtype == torch.bfloat16 else torch.float32
    mask = torch.bernoulli(torch.full_like(tensor, density, dtype=work))
    return _rescaled(tensor.to(work), mask, rescale).to(tensor.dtype)


def della_magprune(tensor: torch.Tensor, density: float, rescale: bool, epsilon: float) -> torch.Tensor:
    """Keep each entry with a probability that grows with its magnitude rank, density ± epsilon per row (DELLA)."""
    if density >= 1:
        return tensor
    if density <= 0:
        return torch.zeros_like(tensor)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError("epsilon must be chosen such that density +/- epsilon is in (0, 1)")
    work = tensor.dtype if tensor.dtype == torch.bfloat16 else torch.float32
    shape = tensor.shape
    rows = tensor.unsqueeze(0) if tensor.dim() < 2 else tensor
    ranks = torch.argsort(rows.abs(), dim=1).argsort(dim=1).to(work) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    probs = (density - epsilon) + ((ranks - low) / (high - low)).clamp(0, 1) * 2 * epsilon
    mask = torch.bernoulli(probs).to(work)
    return _rescaled(rows.to(work), mask, rescale).to(tensor.dtype).reshape(shape)


# ---- methods ------------------------------------------------------------------------------------------------------

def linear(tensors: list[torch.Tensor], base, shared: dict, per_model: list[dict]) -> torch.Tensor:
    """Weighted average: sum(w_i x_i), divided by sum(w_i) when `normalize`; computed in float32."""
    first = tensors[0]
    work = torch.float64 if first.dtype == torch.float64 else torch.float32
    weights = torch.tensor([p["weight"] for p in per_model], dtype=work)
    out = first.to(work) * weights[0]  # equal to mergekit's zeros + addcmul_, one pass over memory fewer
    for t, w in zip(tensors[1:], weights[1:]):
        out.addcmul_(t, w)
    if shared["normalize"]:
        out.div_(weights.sum())
    return out.to(first.dtype)


def slerp(tensors: list[torch.Tensor], base: torch.Tensor, shared: dict, per_model: list[dict],
          dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation from the base (t=0) to the other model (t=1) over the whole flattened tensor;
    linear where the two are (anti)parallel."""
    other = tensors[0]
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    a, b = base.reshape(1, -1).to(work), other.reshape(1, -1).to(work)
    t = torch.tensor(shared["t"], dtype=work).reshape(1, 1)
    if not a.shape[1]:
        return ((1 - t) * a + t * b).reshape(base.shape).to(base.dtype)
    norm_a = torch.linalg.vector_norm(torch.linalg.vector_norm(a, dim=1, keepdim=True)[None], dim=0)
    norm_b = torch.linalg.vector_norm(torch.linalg.vector_norm(b, dim=1, keepdim=True)[None], dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = ((a / norm_a) * (b / norm_b)).sum(dim=1, keepdim=True).clamp(-1, 1)
    straight = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(straight, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(straight, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(straight, t, torch.sin(t * theta) / sin_theta)
    return (coef_a * a + coef_b * b).to(base.dtype).reshape(base.shape)


def task_arithmetic_family(sparsify: Callable | None, consensus: bool) -> Callable:
    """The generalized task arithmetic of TIES/DARE/breadcrumbs/DELLA: sparsify each task vector (model - base),
    weight it, keep the entries that agree with the majority sign (`consensus`), sum, optionally normalize by the
    kept weights, scale by lambda, add to the base."""

    def merge(tensors: list[torch.Tensor], base: torch.Tensor, shared: dict, per_model: list[dict]) -> torch.Tensor:
        if not tensors:
            return base
        deltas = base.new_empty((len(tensors), *base.shape))
        for i, (t, p) in enumerate(zip(tensors, per_model)):
            delta = t - base
            if sparsify is not None:
                extra = {k: p[k] for k in ("gamma", "epsilon") if k in p}
                delta = sparsify(delta, p["density"], shared["rescale"], **extra)
            deltas[i] = delta
        weights = torch.tensor([p["weight"] for p in per_model], dtype=deltas.dtype)
        weights = weights.reshape(-1, *([1] * base.dim()))
        deltas.mul_(weights)
        if consensus:
            mask_dtype = torch.int8 if shared["int8_mask"] else base.dtype
            sign = deltas.sign().to(mask_dtype)
            majority = (deltas.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
            mask = sign == majority
            mixed = (deltas * mask).sum(dim=0)
            divisor = (weights * mask).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = deltas.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if shared["normalize"]:
            mixed /= divisor
        if shared["lambda"] != 1:
            mixed *= shared["lambda"]
        return (base + mixed).to(base.dtype)

    return merge


def model_stock(tensors: list[torch.Tensor], base: torch.Tensor, shared: dict, per_model: list[dict]) -> torch.Tensor:
    """Model Stock: interpolate between the base and the models' average by the mean cosine of their task vectors."""
    shape = base.shape
    if shared["filter_wise"]:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [t.unsqueeze(0) if base.dim() == 1 else t for t in tensors]
    else:
        w0, ws = base.reshape(-1), [t.reshape(-1) for t in tensors]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos),
                    (n * cos) / torch.where(singular, torch.ones_like(denominator), denominator))
    average = sum(ws) / n
    return (t * average + (1 - t) * w0).reshape(shape)


_TASK_SHARED = {"int8_mask": (bool, False), "lambda": (float, 1.0)}
_TASK_MODEL = {"weight": (float, REQUIRED), "density": (float, 1.0)}


def _task(sparsify, consensus: bool, normalize: bool, rescale: bool, extra: dict | None = None) -> MethodSpec:
    return MethodSpec(task_arithmetic_family(sparsify, consensus),
                      shared={**_TASK_SHARED, "normalize": (bool, normalize), "rescale": (bool, rescale)},
                      per_model={**_TASK_MODEL, **(extra or {})}, base=True)


GAMMA = {"gamma": (float, 0.01)}
EPSILON = {"epsilon": (float, 0.15)}

METHODS: dict[str, MethodSpec] = {
    "linear": MethodSpec(linear, shared={"normalize": (bool, True)}, per_model={"weight": (float, REQUIRED)}),
    "slerp": MethodSpec(slerp, shared={"t": (float, REQUIRED)}, base=True, min_inputs=2, max_inputs=2),
    "task_arithmetic": _task(None, consensus=False, normalize=False, rescale=False),
    "ties": _task(magnitude, consensus=True, normalize=True, rescale=False),
    "dare_ties": _task(bernoulli, consensus=True, normalize=False, rescale=True),
    "dare_linear": _task(bernoulli, consensus=False, normalize=False, rescale=True),
    "breadcrumbs": _task(magnitude_outliers, consensus=False, normalize=False, rescale=False, extra=GAMMA),
    "breadcrumbs_ties": _task(magnitude_outliers, consensus=True, normalize=False, rescale=False, extra=GAMMA),
    "della": _task(della_magprune, consensus=True, normalize=True, rescale=True, extra=EPSILON),
    "della_linear": _task(della_magprune, consensus=False, normalize=False, rescale=True, extra=EPSILON),
    "model_stock": MethodSpec(model_stock, shared={"filter_wise": (bool, False)}, base=True, min_inputs=3),
}
