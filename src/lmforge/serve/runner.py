"""Batched prefill and decode for Llama-family models with a slot-based KV cache.

Why not `model.forward` with a transformers Cache: on CPU a 135M model's decode step is dominated by
per-op overhead, and continuous batching needs rows of different lengths in one step. This runner
reads the weights of a loaded transformers model (Llama, Mistral, Qwen2 layouts), fuses q/k/v and
gate/up into single matmuls, and keeps one KV slot per running sequence. Running sequences always
occupy slots 0..B-1 (a finished sequence's slot is refilled by moving the last one), so a decode step
attends over a view of the cache, never a gathered copy. bench/serve_cpu.py measures the result
against `transformers serve`; tests check its logits and greedy tokens against `model.generate`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SUPPORTED = {"llama", "mistral", "qwen2"}
GROW = 256  # cache length grows in steps of this many tokens


@dataclass
class _Layer:
    attn_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    mlp_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


def check_supported(config) -> None:
    """Raise ValueError unless the runner can serve this transformers config."""
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        raise ValueError(f"serving supports {', '.join(sorted(SUPPORTED))} models; this one is {kind!r}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"serving needs a SiLU MLP; this model uses {config.hidden_act!r}")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ValueError(f"serving supports plain RoPE; this model uses {rope.get('rope_type')!r} scaling")
    if kind == "mistral" and getattr(config, "sliding_window", None):
        raise ValueError("serving does not support sliding-window attention")


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


class Runner:
    """Owns the weights and the KV cache; `prefill` starts a sequence in a slot, `decode` advances slots 0..B-1."""

    def __init__(self, model, max_slots: int, max_len: int):
        cfg = model.config
        check_supported(cfg)
        inner = model.model
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self.vocab_size = cfg.vocab_size
        self.max_slots, self.max_len = max_slots, max_len
        with torch.no_grad():
            self.embed = inner.embed_tokens.weight.detach()
            self.norm = inner.norm.weight.detach()
            self.head = model.get_output_embeddings().weight.detach()
            self.layers = []
            for layer in inner.layers:
                a, m = layer.self_attn, layer.mlp
                bias = None
                if a.q_proj.bias is not None:
                    bias = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
                self.layers.append(_Layer(
                    attn_norm=layer.input_layernorm.weight.detach(),
                    qkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach(),
                    qkv_bias=bias,
                    o=a.o_proj.weight.detach(),
                    mlp_norm=layer.post_attention_layernorm.weight.detach(),
                    gate_up=torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach(),
                    down=m.down_proj.weight.detach()))
        hd = self.hd
        inv_freq = 1.0 / (_rope_theta(cfg) ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
        freqs = torch.outer(torch.arange(max_len).float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        sign = torch.cat((-torch.ones(hd // 2), torch.ones(hd // 2)))
        # rotate_half(x) * sin == roll(x, hd/2) * (sign * sin): one roll and one fused multiply-add
        self.cos = emb.cos().to(self.device, self.dtype)
        self.sin = (emb.sin() * sign).to(self.device, self.dtype)
        self.scale = hd ** -0.5
        self.cap = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    # ---- cache -------------------------------------------------------------------------------
    def _ensure(self, length: int) -> None:
        """Grow every layer's cache so each slot holds `length` tokens (existing contents kept)."""
        if length <= self.cap:
            return
        cap = min(self.max_len, -(-length // GROW) * GROW)
        shape = (self.max_slots, self.n_kv, cap, self.hd)
        new_k = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        new_v = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        for old, new in zip(self.k + self.v, new_k + new_v):
            new[:, :, : self.cap].copy_(old)
        self.k, self.v, self.cap = new_k, new_v, cap

    def release(self) -> None:
        """Free the whole cache (called when no sequence is running)."""
        self.k, self.v, self.cap = [], [], 0

    @torch.inference_mode()
    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot `src`'s first `length` cached tokens into slot `dst`."""
        for c in self.k + self.v:
            c[dst, :, :length].copy_(c[src, :, :length])

    # ---- forward -----------------------------------------------------------------------------
    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)

    def _qkv(self, layer: _Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q (B, heads, T, hd), k and v (B, kv_heads, T, hd) for hidden states x (B, T, hidden)."""
        b, t, _ = x.shape
        qkv = F.linear(self._rms(x, layer.attn_norm), layer.qkv, layer.qkv_bias)
        qkv = qkv.view(b, t, self.n_heads + 2 * self.n_kv, self.hd)
        qk, v = qkv.split([self.n_heads + self.n_kv, self.n_kv], dim=2)
        qk = torch.addcmul(qk * cos, qk.roll(self.hd // 2, dims=-1), sin)
        q, k = qk.transpose(1, 2).split([self.n_heads, self.n_kv], dim=1)
        return q, k, v.transpose(1, 2)

    def _mlp_out(self, layer: _Layer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Residual after attention output y (B, T, heads*hd), then the SwiGLU MLP and its residual."""
        x = x + F.linear(y, layer.o)
        gate, up = F.linear(self._rms(x, layer.mlp_norm), layer.gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, layer.down)

    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int], all_logits: bool = False) -> torch.Tensor:
        """Run prompt `ids` into `slot` (positions 0..T-1); logits of the last position, or of all (T, vocab)."""
        t = len(ids)
        self._ensure(t + 1)
        x = self.embed[torch.tensor(ids, device=self.device)][None]
        cos, sin = self.cos[:t, None, :], self.sin[:t, None, :]
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)
            self.k[i][slot, :, :t].copy_(k[0])
            self.v[i][slot, :, :t].copy_(v[0])
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_heads)
            x = self._mlp_out(layer, x, y.transpose(1, 2).reshape(1, t, -1))
        h = self._rms(x[0] if all_logits else x[0, -1:], self.norm)
        return F.linear(h, self.head).float()

    @torch.inference_mode()
    def decode(self, tokens: list[int], lengths: list[int]) -> torch.Tensor:
        """One token for each of slots 0..B-1; `lengths[b]` tokens are cached in slot b. Logits (B, vocab)."""
        b = len(tokens)
        longest = max(lengths) + 1
        self._ensure(longest)
        pos = torch.tensor(lengths, device=self.device)
        x = self.embed[torch.tensor(tokens, device=self.device)][:, None]
        cos, sin = self.cos[pos][:, None, None, :], self.sin[pos][:, None, None, :]
        # mask[b, t] = 0 where slot b has a token at position t (after this step's write), else -inf
        mask = torch.arange(longest, device=self.device)[None, :] > pos[:, None]
        mask = torch.zeros(mask.shape, device=self.device, dtype=self.dtype).masked_fill_(mask, float("-inf"))
        mask = mask[:, None, None, :]
        rows = torch.arange(b, device=self.device)
        g = self.n_heads // self.n_kv
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)
            kc, vc = self.k[i], self.v[i]
            kc[rows, :, pos] = k[:, :, 0]
            vc[rows, :, pos] = v[:, :, 0]
            q = q.reshape(b, self.n_kv, g, self.hd)
            att = torch.matmul(q, kc[:b, :, :longest].transpose(-1, -2)).mul_(self.scale).add_(mask)
            y = torch.matmul(att.softmax(dim=-1), vc[:b, :, :longest])  # (B, kv, g, hd) = heads in HF order
            x = self._mlp_out(layer, x, y.reshape(b, 1, -1))
        return F.linear(self._rms(x[:, 0], self.norm), self.head).float()
