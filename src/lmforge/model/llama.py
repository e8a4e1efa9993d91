"""A lean Llama decoder that reads and writes transformers' LlamaForCausalLM weights.

Why our own module: at small sizes on CPU, per-op overhead decides speed (DESIGN.md). This one
fuses q/k/v and gate/up into single matmuls, applies RoPE to q and k in one pass, and on CPU
under bf16 autocast uses explicit attention matmuls (the CPU flash-SDPA backward in bf16 is ~4x
slower at these sizes). Checkpoints are plain HF Llama directories: `lean_to_hf` splits the
fused weights back into q_proj/k_proj/v_proj and gate_proj/up_proj. bench/pretrain_cpu.py
measures the gain against nanoGPT; tests check logits equal LlamaForCausalLM's on the same weights.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.config import ModelConfig
from lmforge.model.sharded import LazyWeights


def rope_tables(cfg: ModelConfig, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables for the q and k heads together, shape (seq_len, heads + kv_heads, head_dim).

    HF computes x*cos + rotate_half(x)*sin with rotate_half(x) = cat(-x2, x1) = roll(x, d/2) * [-1.., +1..];
    folding the sign into sin leaves one roll and one fused multiply-add per rotation. The q rows also
    carry attention's 1/sqrt(head_dim), which saves a pass over the (T x T) scores.
    """
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd))
    freqs = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    sign = torch.cat((-torch.ones(hd // 2, device=device), torch.ones(hd // 2, device=device)))
    scale = torch.ones(cfg.num_heads + cfg.num_kv_heads, 1, device=device)
    scale[: cfg.num_heads] = 1.0 / math.sqrt(hd)
    return emb.cos() * scale, emb.sin() * sign * scale


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.attn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.qkv = nn.Linear(cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, bias=False)
        self.o = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.mlp_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.qkv(self.attn_norm(x)).view(b, t, self.n_heads + 2 * self.n_kv, self.hd)
        qk, v = qkv.split([self.n_heads + self.n_kv, self.n_kv], dim=2)
        qk = torch.addcmul(qk * cos, qk.roll(self.hd // 2, dims=-1), sin)
        q, k = qk.transpose(1, 2).split([self.n_heads, self.n_kv], dim=1)
        v = v.transpose(1, 2)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0, enable_gqa=self.n_kv != self.n_heads)
        else:
            if self.n_kv != self.n_heads:
                k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
                v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            att = torch.matmul(q, k.transpose(-1, -2)) + mask[:t, :t]  # q is pre-scaled (rope_tables)
            y = torch.matmul(att.softmax(dim=-1), v)
        x = x + self.o(y.transpose(1, 2).reshape(b, t, -1))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class LeanLlama(nn.Module):
    """Llama decoder: embed -> N x (RMSNorm, attention with RoPE, RMSNorm, SwiGLU) -> RMSNorm -> head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is not set (it is normally read from the token shards)")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = rope_tables(cfg, cfg.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("causal_mask", torch.full((cfg.max_seq_len, cfg.max_seq_len), float("-inf")).triu(1),
                             persistent=False)
        self.gradient_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2/nanoGPT init: N(0, std), residual output projections scaled by 1/sqrt(2 * layers)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("o.weight", "down.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.num_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (batch, time) -> logits (batch, time, vocab)."""
        t = idx.shape[1]
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds model.max_seq_len {self.cfg.max_seq_len}")
        x = self.embed(idx)
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        if torch.is_autocast_enabled(x.device.type):  # rotate in the matmul dtype, as transformers does
            dtype = torch.get_autocast_dtype(x.device.type)
            cos, sin = cos.to(dtype), sin.to(dtype)
        # Explicit attention only where it wins: CPU under autocast (see module docstring).
        mask = self.causal_mask if (not x.is_cuda and torch.is_autocast_enabled("cpu")) else None
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask)
        return self.head(self.norm(x))


# ---- HF weight names ----------------------------------------------------------------------------

def lean_to_hf(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> LazyWeights:
    """LeanLlama state dict -> LlamaForCausalLM names, fused matrices split back into HF's.

    Lazy: each HF tensor is cut from `sd` when asked for, so a lazily loaded `sd` (a sharded checkpoint's
    `ShardedWeights`) converts and streams to disk one tensor at a time.
    """
    q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim

    def same(name):
        return lambda: sd[name].detach().contiguous()

    def piece(name, sizes, i):
        return lambda: sd[name].detach().split(sizes, dim=0)[i].contiguous()

    out = {"model.embed_tokens.weight": same("embed.weight"), "model.norm.weight": same("norm.weight")}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = same("head.weight")
    ffn = cfg.intermediate_size
    for i in range(cfg.num_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        qkv = [q_out, kv_out, kv_out]
        out.update({
            dst + "input_layernorm.weight": same(src + "attn_norm.weight"),
            dst + "self_attn.q_proj.weight": piece(src + "qkv.weight", qkv, 0),
            dst + "self_attn.k_proj.weight": piece(src + "qkv.weight", qkv, 1),
            dst + "self_attn.v_proj.weight": piece(src + "qkv.weight", qkv, 2),
            dst + "self_attn.o_proj.weight": same(src + "o.weight"),
            dst + "post_attention_layernorm.weight": same(src + "mlp_norm.weight"),
            dst + "mlp.gate_proj.weight": piece(src + "gate_up.weight", [ffn, ffn], 0),
            dst + "mlp.up_proj.weight": piece(src + "gate_up.weight", [ffn, ffn], 1),
            dst + "mlp.down_proj.weight": same(src + "down.weight"),
        })
    return LazyWeights(out)


def hf_to_lean(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM weights (e.g. a checkpoint's model.safetensors) -> LeanLlama names, fused."""
    def take(name):
        if name not in sd:
            raise KeyError(f"weight {name!r} missing from the checkpoint")
        return sd[name]

    out = {"embed.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    out["head.weight"] = out["embed.weight"] if cfg.tie_embeddings else take("lm_head.weight")
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        out.update({
            dst + "attn_norm.weight": take(src + "input_layernorm.weight"),
            dst + "qkv.weight": torch.cat([take(src + f"self_attn.{n}_proj.weight") for n in "qkv"]),
            dst + "o.weight": take(src + "self_attn.o_proj.weight"),
            dst + "mlp_norm.weight": take(src + "post_attention_layernorm.weight"),
            dst + "gate_up.weight": torch.cat([take(src + "mlp.gate_proj.weight"), take(src + "mlp.up_proj.weight")]),
            dst + "down.weight": take(src + "mlp.down_proj.weight"),
        })
    return out
