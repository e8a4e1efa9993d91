"""Memory of a training or serving job from its shape alone: pure formulas, no torch, no model built.

They count the tensors our engine keeps (train/state.py, step.py, optim.py, finetune.py), as measured tensor by
tensor with lmforge.plan.measure on CPU:
- full training keeps fp32 parameters (the master weights) and runs bf16/fp16 under autocast, whose weight casts
  (2 B per matrix parameter) live from the forward until their layer's backward; fp32 gradients; fused AdamW's two
  fp32 moments (8 B per trained parameter). No separate master copy exists, since the parameters are fp32.
- LoRA stores the frozen base in the compute dtype and trains fp32 adapters; QLoRA stores the decoder's linear
  weights in 4 bits (NF4/FP4, blocks of 64 with an fp32 absmax, or an 8-bit absmax plus an fp32 constant per 256
  blocks with double quantisation) and, as peft's prepare_model_for_kbit_training does, the rest in fp32.
- activations per layer follow Korthikanti et al. 2022 (each tensor the backward needs, by its dtype), written for
  a SwiGLU MLP and grouped-query attention: SDPA/flash keeps q, k, v, the output and a log-sum-exp row (no s^2
  term); explicit attention (lean model on CPU under autocast) keeps the (s x s) probabilities. Recompute
  (gradient checkpointing) keeps one layer input per layer and rebuilds one layer at a time.
- the loss keeps three (tokens x vocab) fp32 tensors at its backward (log-softmax output, its gradient, the
  logits' gradient): with a large vocabulary this, not the layers, is often the peak.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

GB = 1e9  # decimal gigabytes, as device makers and the guides count
QUANT_BLOCK = 64  # bitsandbytes 4-bit block size
DOUBLE_QUANT_BLOCK = 256  # absmax values per second-level constant
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CUDA_CONTEXT_BYTES = 0.6 * GB  # CUDA context, cuBLAS/cuDNN workspaces: what nvidia-smi shows before any tensor
ALLOCATOR_FRACTION = 0.10  # the caching allocator's fragmentation and rounding, as a share of the tensors


@dataclass(frozen=True)
class ModelShape:
    """A Llama-architecture decoder's dimensions (LlamaConfig's, with our names)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    tie_embeddings: bool
    head_dim: int

    @classmethod
    def from_config(cls, cfg) -> "ModelShape":
        """From a ModelConfig (vocab_size must be set)."""
        return cls(cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
                   cfg.intermediate_size, bool(cfg.tie_embeddings), cfg.head_dim)

    @classmethod
    def from_hf(cls, c: dict) -> "ModelShape":
        """From a transformers config.json (Llama-family keys)."""
        heads = c["num_attention_heads"]
        return cls(c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], heads,
                   c.get("num_key_value_heads") or heads, c["intermediate_size"], bool(c.get("tie_word_embeddings")),
                   c.get("head_dim") or c["hidden_size"] // heads)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer, by its transformers name."""
        d, q, kv, f = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, \
            self.intermediate_size
        return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}

    @property
    def layer_matrix_params(self) -> int:
        return sum(i * o for i, o in self.linear_shapes().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        """The output projection's own parameters (0 when tied to the embedding)."""
        return 0 if self.tie_embeddings else self.vocab_size * self.hidden_size

    @property
    def norm_params(self) -> int:
        return (2 * self.num_layers + 1) * self.hidden_size

    @property
    def n_params(self) -> int:
        return self.num_layers * self.layer_matrix_params + self.embedding_params + self.head_params + self.norm_params


@dataclass(frozen=True)
class TrainSetup:
    """How a training job runs on one device; every field is a config key or follows from one."""

    method: str = "full"  # full | lora | qlora
    micro_batch: int = 1
    seq_len: int = 2048
    grad_accum: int = 1
    precision: str = "bf16"  # bf16 | fp16 | fp32 (resolved for the device)
    grad_checkpointing: bool = False
    impl: str = "lean"  # lean (our fused module, pretraining) | hf (transformers LlamaForCausalLM, fine-tuning)
    attention: str = "sdpa"  # sdpa (flash / memory-efficient: no s^2 kept) | eager (the s x s probabilities kept)
    parallel: str = "none"  # none | ddp | fsdp
    world_size: int = 1
    cpu_offload: bool = False  # FSDP keeps parameters, gradients and optimizer states in host memory
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    lora_dropout: float = 0.05
    double_quant: bool = True
    cuda: bool = True  # counts the CUDA context and the allocator's slack

    @property
    def compute_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2


@dataclass
class MemoryEstimate:
    """Bytes per device by what holds them; `host` is what CPU offload moves to host memory."""

    weights: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    buffers: float = 0.0  # DDP gradient buckets, FSDP's gathered (unsharded) parameters
    kv_cache: float = 0.0
    overhead: float = 0.0  # CUDA context and allocator slack
    host: float = 0.0
    # Whether gradients and activations are alive together. With one micro-batch per step the peak is at the loss's
    # backward, before any gradient exists, or at the end of the backward, with every gradient and few activations;
    # accumulation keeps the earlier micro-batches' gradients through the next one's activations.
    grads_overlap: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def tensors(self) -> float:
        """What live tensors hold at the peak: the figure `lmforge.plan.measure` measures."""
        varying = self.grads + self.activations if self.grads_overlap else max(self.grads, self.activations)
        return self.weights + self.optimizer + varying + self.buffers + self.kv_cache

    @property
    def total(self) -> float:
        return self.tensors + self.overhead

    def gb(self) -> dict[str, float]:
        keys = ("weights", "grads", "optimizer", "activations", "buffers", "kv_cache", "overhead", "host")
        out = {f"{k}_gb": round(getattr(self, k) / GB, 4) for k in keys}
        out["total_gb"] = round(self.total / GB, 4)
        return out


def lora_params(shape: ModelShape, r: int, targets: tuple[str, ...]) -> int:
    """Adapter parameters: A (r x in) and B (out x r) for every targeted linear of every layer."""
    shapes = shape.linear_shapes()
    return shape.num_layers * sum(r * (i + o) for name, (i, o) in shapes.items() if name in targets)


def quantized_bytes(n: int, double_quant: bool) -> float:
    """4-bit weights with their constants: 0.5 B/param plus an fp32 absmax per block of 64, or, with double
    quantisation, an 8-bit absmax per block plus an fp32 constant per 256 absmax values."""
    blocks = n / QUANT_BLOCK
    constants = blocks * 1 + blocks / DOUBLE_QUANT_BLOCK * 4 if double_quant else blocks * 4
    return n / 2 + constants


def _norm(t: int, d: int, p: int, consumers: int) -> int:
    """RMSNorm: its rstd row and normalised input (fp32, as the residual stream is) and what its consumers keep:
    the output itself in fp32, or under autocast each linear's own cast of it."""
    return 4 * t + 4 * t * d + (4 * t * d if p == 4 else consumers * p * t * d)


def layer_activations(shape: ModelShape, s: TrainSetup, first: bool = False) -> int:
    """Bytes one decoder layer keeps for its backward (micro-batch x sequence tokens); `first`: layer 0."""
    if s.method != "full":
        return _adapter_layer(shape, s, first)
    b, n = s.micro_batch, s.seq_len
    t, d, f, hd = b * n, shape.hidden_size, shape.intermediate_size, shape.head_dim
    h, kv, p = shape.num_heads, shape.num_kv_heads, s.compute_bytes
    x = 4 * t * d  # the residual stream is fp32: the embedding's output plus fp32 and autocast outputs
    if s.impl == "lean":
        total = x + _norm(t, d, p, 1)
        if s.attention == "eager":  # q, k, v made contiguous (k, v repeated to all heads), the (s x s) probs
            # fp32 + their cast when the fp32 mask promotes the scores; under FSDP's bf16 parameters the embedding,
            # and so the residual stream and the scores, are bf16 already (the norms still keep fp32 copies)
            scores = p if s.parallel == "fsdp" and s.world_size > 1 else 4 + p
            total += 3 * p * t * h * hd + scores * b * h * n * n + p * t * h * hd
        else:  # qkv output (v is a view of it), rotated q and k, SDPA's output and log-sum-exp
            total += p * t * (h + 2 * kv) * hd + p * t * (h + kv) * hd + p * t * h * hd + 4 * b * h * n
        return total + x + _norm(t, d, p, 1) + p * t * 2 * f + 2 * p * t * f  # gate_up output, silu, product
    total = x + _norm(t, d, p, 3)
    total += p * t * h * hd + 2 * p * t * kv * hd + p * t * h * hd + 4 * b * h * n  # q, k rotated, v, out, lse
    return total + x + _norm(t, d, p, 2) + 4 * p * t * f  # gate, silu, up, product


def _adapter_layer(shape: ModelShape, s: TrainSetup, first: bool) -> int:
    """A layer of a frozen base with adapters: frozen linears keep nothing; norms keep their fp32 input; adapters keep
    their input (dropout's noise, in fp32 as peft casts to the adapter's dtype, and the cast for lora_A) and A's
    output. LoRA's layer 0 gets an input without gradient (the frozen embedding), so its norm and q/k/v adapters
    keep less, unless QLoRA recomputes (prepare_model_for_kbit_training then makes the embedding's output require
    grad)."""
    b, n = s.micro_batch, s.seq_len
    t, d, f, hd = b * n, shape.hidden_size, shape.intermediate_size, shape.head_dim
    h, kv, p = shape.num_heads, shape.num_kv_heads, s.compute_bytes
    qlora = s.method == "qlora"
    r = 4 if qlora or p == 4 else p  # the residual stream: QLoRA's embedding and norms are fp32
    no_grad_in = first and not (qlora and s.grad_checkpointing)
    shapes = shape.linear_shapes()

    def adapter(name: str, grad_in: bool = True) -> int:
        if name not in s.lora_targets:
            return 0
        i = shapes[name][0]
        noise = 4 * t * i if s.lora_dropout > 0 and grad_in else 0
        return noise + p * t * i + p * t * s.lora_r

    norm = 4 * t * d + 4 * t
    total = (0 if no_grad_in else norm) + sum(adapter(k, not no_grad_in) for k in ("q_proj", "k_proj", "v_proj"))
    total += p * t * h * hd + 2 * p * t * kv * hd + p * t * h * hd + 4 * b * h * n + adapter("o_proj")
    total += norm + 3 * r * t * f + adapter("gate_proj") + adapter("up_proj") + adapter("down_proj")
    return total


def head_activations(shape: ModelShape, s: TrainSetup) -> int:
    """The final norm, the head's input, and the loss's three (tokens x vocab) fp32 tensors at its backward."""
    t, d, p = s.micro_batch * s.seq_len, shape.hidden_size, s.compute_bytes
    loss = 3 * 4 * t * shape.vocab_size
    if s.method == "full":
        return 4 * t * d + _norm(t, d, p, 1) + loss
    head_cast = p * shape.vocab_size * d if s.method == "qlora" and p != 4 else 0  # the fp32 head's autocast cast
    return 4 * t * d + 4 * t + loss + head_cast


def rope_bytes(shape: ModelShape, s: TrainSetup) -> int:
    """RoPE tables cast for one forward (lean under autocast: q and k heads; transformers: one fp32 row)."""
    if s.impl == "lean":
        return 2 * s.seq_len * (shape.num_heads + shape.num_kv_heads) * shape.head_dim * s.compute_bytes \
            if s.precision != "fp32" else 0
    r = 4 if s.method in ("full", "qlora") else s.compute_bytes
    return 2 * s.micro_batch * s.seq_len * shape.head_dim * r  # per row: fine-tuning passes position ids


def activation_bytes(shape: ModelShape, s: TrainSetup) -> int:
    """Activations at the peak of one micro-batch's forward and backward."""
    per_layer = layer_activations(shape, s)
    head = head_activations(shape, s) + rope_bytes(shape, s)
    if not s.grad_checkpointing:
        return (shape.num_layers - 1) * per_layer + layer_activations(shape, s, first=True) + head
    kept = shape.num_layers * 4 * s.micro_batch * s.seq_len * shape.hidden_size  # each layer's input
    return kept + max(head, per_layer)


def training_memory(shape: ModelShape, s: TrainSetup) -> MemoryEstimate:
    """Per-device memory of one training step at its peak, for our engine and setup."""
    e = MemoryEstimate()
    n, world = shape.n_params, s.world_size
    shard = world if s.parallel == "fsdp" else 1  # FSDP shards parameters, gradients and optimizer states
    p = s.compute_bytes
    matrices = shape.num_layers * shape.layer_matrix_params + shape.head_params + (
        shape.embedding_params if shape.tie_embeddings else 0)  # what the matmuls use (a tied head: the embedding)
    fsdp = s.parallel == "fsdp" and world > 1
    if fsdp:  # gathered in the compute dtype, so autocast casts nothing
        block = shape.layer_matrix_params + 2 * shape.hidden_size
        root = shape.embedding_params + shape.head_params + shape.hidden_size
        e.buffers += p * (block + root)
        e.notes.append("buffers: FSDP's gathered root (embedding, head) and one gathered block, in the compute dtype")
    if s.method == "full":
        trained = n
        e.weights = 4 * n / shard
        e.notes.append("weights: fp32 parameters (the master weights; no second copy)")
        if p != 4 and not fsdp:
            e.weights += p * matrices
            e.notes.append(f"weights: + autocast's {p}-byte cast of every matrix, alive until its backward")
    else:
        trained = lora_params(shape, s.lora_r, s.lora_targets)
        rest = n - shape.num_layers * shape.layer_matrix_params
        if s.method == "qlora":
            base = quantized_bytes(shape.num_layers * shape.layer_matrix_params, s.double_quant) + 4 * rest
            e.notes.append("weights: 4-bit decoder matrices with their quantisation constants; embedding, head and "
                           "norms fp32 (prepare_model_for_kbit_training)")
        else:
            base = p * n
            e.notes.append(f"weights: frozen base in {p}-byte compute dtype")
        e.weights = base / shard + 4 * trained / shard
        if p != 4:
            e.weights += p * trained  # autocast casts of the adapters
    e.grads = 4 * trained / shard
    e.optimizer = 8 * trained / shard
    if s.parallel == "ddp" and world > 1:
        e.buffers += 4 * trained
        e.notes.append("buffers: DDP's gradient buckets, a second copy of the gradients")
    e.activations = activation_bytes(shape, s)
    e.grads_overlap = s.grad_accum > 1
    if s.cpu_offload and s.parallel == "fsdp":
        e.host = e.weights + e.grads + e.optimizer
        e.weights = e.grads = e.optimizer = 0.0
        e.notes.append("cpu_offload: sharded parameters, gradients and optimizer states live in host memory")
    if s.cuda:
        e.overhead = CUDA_CONTEXT_BYTES + ALLOCATOR_FRACTION * e.tensors
    return e


def serving_memory(shape: ModelShape, max_batch: int, max_model_len: int, dtype_bytes: int,
                   cuda: bool = True) -> MemoryEstimate:
    """Weights plus a full KV cache (K and V, every layer, every slot at max_model_len) plus one step's logits."""
    e = MemoryEstimate()
    e.weights = dtype_bytes * shape.n_params
    e.kv_cache = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * max_model_len * max_batch * dtype_bytes
    e.activations = max_batch * shape.vocab_size * 4 + max_batch * max_model_len * shape.hidden_size * dtype_bytes
    e.notes.append("kv_cache: 2 (K, V) x layers x kv_heads x head_dim x max_model_len x max_batch x dtype bytes")
    if cuda:
        e.overhead = CUDA_CONTEXT_BYTES + ALLOCATOR_FRACTION * e.tensors
    return e


def fit_micro_batch(shape: ModelShape, s: TrainSetup, capacity: float) -> tuple[int, int]:
    """The largest micro-batch that divides micro_batch x grad_accum and whose estimate fits `capacity` bytes, with
    the accumulation that keeps the same windows per step."""
    from lmforge.errors import UserError

    batch = s.micro_batch * s.grad_accum
    for mb in sorted((m for m in range(1, batch + 1) if batch % m == 0), reverse=True):
        if training_memory(shape, replace(s, micro_batch=mb, grad_accum=batch // mb)).total <= capacity:
            return mb, batch // mb
    need = training_memory(shape, replace(s, micro_batch=1, grad_accum=batch)).total
    raise UserError(f"train.auto_micro_batch: even micro_batch_size=1 needs ~{need / GB:.1f} GB, more than this "
                    f"device's {capacity / GB:.1f} GB; run `lmforge plan memory` with your config for what would fit")


def auto_micro_batch(shape: ModelShape, tc, seq_len: int, precision: str, device, world_size: int) -> tuple[int, int]:
    """(micro_batch_size, grad_accum) for a pretraining TrainConfig `tc` on a torch `device`, by fit_micro_batch."""
    import torch

    cuda = device.type == "cuda"
    capacity = torch.cuda.get_device_properties(device).total_memory if cuda else \
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    eager = device.type == "cpu" and precision != "fp32"  # the lean model's attention path (llama.py)
    setup = TrainSetup(micro_batch=tc.micro_batch_size, seq_len=seq_len, grad_accum=tc.grad_accum, precision=precision,
                       grad_checkpointing=tc.grad_checkpointing, attention="eager" if eager else "sdpa",
                       parallel=tc.parallel, world_size=world_size, cpu_offload=bool(getattr(tc, "cpu_offload", False)),
                       cuda=cuda)
    return fit_micro_batch(shape, setup, capacity)
