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

from lmforge.errors import UserError

SUPPORTED = {"llama", "mistral", "qwen2"}
GROW = 256  # cache length grows in steps of this many tokens


def _linear_fn(device: torch.device, dtype: torch.dtype, batch_hint: int):
    """(pack, linear): oneDNN-prepacked weights on CPU, plain F.linear elsewhere.

    MKL's sgemm repacks the weight on every call, which at decode's few rows costs as much as the
    product: prepacking once halves a decode step on CPU (bench/serve_cpu.py). `batch_hint` is the
    row count oneDNN tunes the layout for; other row counts work too.
    """
    ops = getattr(torch.ops, "mkldnn", None)
    if device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available() and \
            hasattr(ops, "_reorder_linear_weight"):
        def pack(w):
            return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), batch_hint)

        def linear(x, w, bias=None):
            return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
        return pack, linear
    return (lambda w: w), F.linear


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
    """Raise UserError unless the runner can serve this transformers config."""
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        raise UserError(f"serving supports {', '.join(sorted(SUPPORTED))} models; this one is {kind!r}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UserError(f"serving needs a SiLU MLP; this model uses {config.hidden_act!r}")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise UserError(f"serving supports plain RoPE; this model uses {rope.get('rope_type')!r} scaling")
    if kind == "mistral" and getattr(config, "sliding_window", None):
        raise UserError("serving does not support sliding-window attention")


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
        pack, self.linear = _linear_fn(self.device, self.dtype, min(max_slots, 32))
        with torch.no_grad():
            self.embed = inner.embed_tokens.weight.detach()
            self.norm = inner.norm.weight.detach()
            self.head = pack(model.get_output_embeddings().weight.detach())
            self.layers = []
            for layer in inner.layers:
                a, m = layer.self_attn, layer.mlp
                bias = None
                if a.q_proj.bias is not None:
                    bias = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]).detach()
                self.layers.append(_Layer(
                    attn_norm=layer.input_layernorm.weight.detach(),
                    qkv=pack(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach()),
                    qkv_bias=bias,
                    o=pack(a.o_proj.weight.detach()),
                    mlp_norm=layer.post_attention_layernorm.weight.detach(),
                    gate_up=pack(torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach()),
                    down=pack(m.down_proj.weight.detach())))
        hd = self.hd
        inv_freq = 1.0 / (_rope_theta(cfg) ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
        freqs = torch.outer(torch.arange(max_len).float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        sign = torch.cat((-torch.ones(hd // 2), torch.ones(hd // 2)))
        # rotate_half(x) * sin == roll(x, hd/2) * (sign * sin): one roll and one fused multiply-add
        self.cos = emb.cos().to(self.device, self.dtype)
        self.sin = (emb.sin() * sign).to(self.device, self.dtype)
        self.scale = hd ** -0.5
        self.slots = self.cap = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    # ---- cache -------------------------------------------------------------------------------
    def _ensure(self, slots: int, length: int) -> None:
        """Grow the cache to hold `slots` sequences of `length` tokens each, keeping what it holds.

        Both sizes grow in steps (8 slots, GROW tokens), so memory follows the traffic rather than
        max_batch x max_model_len, and a growing batch reallocates only now and then."""
        if slots <= self.slots and length <= self.cap:
            return
        slots = min(self.max_slots, max(self.slots, -(-slots // 8) * 8))
        cap = min(self.max_len, max(self.cap, -(-length // GROW) * GROW))
        shape = (slots, self.n_kv, cap, self.hd)
        new_k = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        new_v = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        for old, new in zip(self.k + self.v, new_k + new_v):
            new[: self.slots, :, : self.cap].copy_(old)
        self.k, self.v, self.slots, self.cap = new_k, new_v, slots, cap

    def release(self) -> None:
        """Free the whole cache (the engine calls this when it has been idle for a while)."""
        self.k, self.v, self.slots, self.cap = [], [], 0, 0

    @torch.inference_mode()
    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot `src`'s first `length` cached tokens into slot `dst`."""
        self._ensure(max(src, dst) + 1, length)
        for c in self.k + self.v:
            c[dst, :, :length].copy_(c[src, :, :length])

    # ---- forward -----------------------------------------------------------------------------
    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)

    def _qkv(self, layer: _Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q (B, heads, T, hd), k and v (B, kv_heads, T, hd) for hidden states x (B, T, hidden); cos and sin
        broadcast against (B, T, heads, hd)."""
        b, t, _ = x.shape
        qkv = self.linear(self._rms(x, layer.attn_norm), layer.qkv, layer.qkv_bias)
        qkv = qkv.view(b, t, self.n_heads + 2 * self.n_kv, self.hd)
        qk, v = qkv.split([self.n_heads + self.n_kv, self.n_kv], dim=2)
        qk = torch.addcmul(qk * cos, qk.roll(self.hd // 2, dims=-1), sin)
        q, k = qk.transpose(1, 2).split([self.n_heads, self.n_kv], dim=1)
        return q, k, v.transpose(1, 2)

    def _mlp_out(self, layer: _Layer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Residual after attention output y (B, T, heads*hd), then the SwiGLU MLP and its residual."""
        x = x + self.linear(y, layer.o)
        gate, up = self.linear(self._rms(x, layer.mlp_norm), layer.gate_up).chunk(2, dim=-1)
        return x + self.linear(F.silu(gate) * up, layer.down)

    @torch.inference_mode()
    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, hidden) of whole rows, without the cache (scoring, not generation).

        `positions` (B, T) are each token's RoPE position; `mask` (B, 1, T, T), True where a token may attend,
        lets one row hold a context and several continuations that each see only the context and themselves
        (lm-eval scores them as separate rows). Without a mask, attention is causal (right padding is harmless).
        """
        x = self.embed[ids]
        cos, sin = self.cos[positions][:, :, None, :], self.sin[positions][:, :, None, :]
        gqa = self.n_heads != self.n_kv
        for layer in self.layers:
            q, k, v = self._qkv(layer, x, cos, sin)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
            x = self._mlp_out(layer, x, y.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))
        return self._rms(x, self.norm)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """float32 logits of hidden states from `hidden`."""
        return self.linear(h, self.head).float()

    @torch.inference_mode()
    def forward(self, decode: list[tuple[int, int]], prefills: list[tuple[int, list[int], bool]]):
        """One pass over the weights for a mixed batch; returns (decode logits (B, vocab), [prefill logits]).

        `decode[b] = (token, cached)`: slot b (slots 0..B-1) holds `cached` tokens and gets `token` at that
        position. `prefills[i] = (slot, ids, all_logits)`: a new prompt written into `slot` (>= B) at positions
        0..T-1; its logits are the last position's (1, vocab), or every position's (T, vocab). Decode and prefill
        tokens share every matmul (vLLM's mixed batches), so admitting a request costs no extra weight pass.
        """
        b = len(decode)
        tokens = [t for t, _ in decode] + [t for _, ids, _ in prefills for t in ids]
        positions = [n for _, n in decode] + [p for _, ids, _ in prefills for p in range(len(ids))]
        self._ensure(max([len(decode)] + [slot + 1 for slot, _, _ in prefills]), max(positions) + 2)
        dev = self.device
        pos = torch.tensor(positions, device=dev)
        x = self.embed[torch.tensor(tokens, device=dev)][None]  # (1, N, hidden): every token is one row
        cos, sin = self.cos[pos][None, :, None, :], self.sin[pos][None, :, None, :]
        if b:
            longest = max(n for _, n in decode) + 1
            dpos = pos[:b]
            # mask[b, t] = 0 where slot b has a token at position t (after this step's write), else -inf
            mask = torch.arange(longest, device=dev)[None, :] > dpos[:, None]
            mask = torch.zeros(mask.shape, device=dev, dtype=self.dtype).masked_fill_(mask, float("-inf"))[:, None, None]
            rows = torch.arange(b, device=dev)
        g = self.n_heads // self.n_kv
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)  # (1, heads, N, hd), (1, kv, N, hd)
            kc, vc = self.k[i], self.v[i]
            ys = []
            if b:
                kc[rows, :, dpos] = k[0, :, :b].transpose(0, 1)
                vc[rows, :, dpos] = v[0, :, :b].transpose(0, 1)
                qd = q[0, :, :b].transpose(0, 1).reshape(b, self.n_kv, g, self.hd)
                att = torch.matmul(qd, kc[:b, :, :longest].transpose(-1, -2)).mul_(self.scale).add_(mask)
                ys.append(torch.matmul(att.softmax(dim=-1), vc[:b, :, :longest]).reshape(b, -1))  # HF head order
            start = b
            for slot, ids, _ in prefills:
                end = start + len(ids)
                kc[slot, :, : len(ids)] = k[0, :, start:end]
                vc[slot, :, : len(ids)] = v[0, :, start:end]
                y = F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end],
                                                   is_causal=True, enable_gqa=g != 1)
                ys.append(y[0].transpose(0, 1).reshape(len(ids), -1))
                start = end
            x = self._mlp_out(layer, x, torch.cat(ys)[None] if len(ys) > 1 else ys[0][None])
        h = self._rms(x[0], self.norm)
        picks, start = list(range(b)), b
        spans = []
        for _, ids, all_logits in prefills:
            first = start if all_logits else start + len(ids) - 1
            spans.append((len(picks), len(picks) + start + len(ids) - first))
            picks += range(first, start + len(ids))
            start += len(ids)
        logits = self.linear(h[torch.tensor(picks, device=dev)] if len(picks) < h.shape[0] else h, self.head).float()
        return logits[:b], [logits[a:z] for a, z in spans]
