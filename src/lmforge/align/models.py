"""What alignment trains and scores: packed rows of (prompt, answer) sequences, and the modules that read them.

A micro-batch is one padding-free row: its sequences back to back, kept apart by position ids that
restart at 0 (transformers builds the block-diagonal mask from them when no attention mask is given),
with logits computed only where an answer token is predicted. `data.packing=false` gives each
sequence its own right-padded row instead: more positions, but attention only within each row. A DPO pair is two sequences in one
row; a GRPO group is G. `PolicyModel` (a causal LM, optionally with PPO's value head) and
`RewardModel` (a sequence classifier's backbone and score) are the modules the engine wraps, so
DDP/FSDP, checkpoints and precision apply to them as to any model.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import torch
from torch import nn


def pack(seqs: Sequence[tuple[Sequence[int], Sequence[int]]], rows: bool = False) -> dict[str, torch.Tensor]:
    """A batch of (prompt, answer) sequences: one padding-free row, or (`rows`) one right-padded row each.

    Positions are flat indices into the (rows x length) batch. keep: the positions whose next token is an
    answer token (where logits are needed); targets: those tokens; seg: the sequence each belongs to; last:
    each sequence's last position; answer_tokens: each answer's length; value_positions: per sequence, its
    keep positions and its last position (PPO's values). Right padding needs no attention mask: under the
    causal mask no real token sees the padding after it.
    """
    seqs = [(list(map(int, p)), list(map(int, a))) for p, a in seqs]
    if any(not p for p, _ in seqs):
        raise ValueError("a sequence needs at least one prompt token to predict its answer from")
    width = max(len(p) + len(a) for p, a in seqs)
    ids, pos, keep, tgt, seg, last, alen, vpos = [], [], [], [], [], [], [], []
    x = 0
    for s, (prompt, answer) in enumerate(seqs):
        p, a = len(prompt), len(answer)
        n = width if rows else p + a
        ids += prompt + answer + [0] * (n - p - a)
        pos += range(n)
        keep += range(x + p - 1, x + p + a - 1)
        tgt += answer
        seg += [s] * a
        last.append(x + p + a - 1)
        alen.append(a)
        vpos += range(x + p - 1, x + p + a)
        x += n
    t = lambda v: torch.as_tensor(np.asarray(v, dtype=np.int64))  # noqa: E731
    shape = (len(seqs), width) if rows else (1, x)
    return {"input_ids": t(ids).view(shape), "position_ids": t(pos).view(shape), "keep": t(keep), "targets": t(tgt),
            "seg": t(seg), "last": t(last), "answer_tokens": t(alen), "value_positions": t(vpos),
            "n_tokens": torch.tensor(sum(len(p) + len(a) for p, a in seqs))}


def seq_sum(values: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
    """Per-sequence sums of per-token `values`."""
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, seg, values)


def to_padded(values: torch.Tensor, lengths: torch.Tensor, width: int | None = None, fill: float = 0.0
              ) -> torch.Tensor:
    """Concatenated per-sequence values -> (S, width), each row left-aligned and filled after its length."""
    width = int(lengths.max()) if width is None else width
    out = torch.full((len(lengths), width), fill, dtype=values.dtype, device=values.device)
    mask = torch.arange(width, device=values.device)[None] < lengths.to(values.device)[:, None]
    out[mask] = values
    return out


def token_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities of `targets` under (N, V) logits (and each row's entropy), in fp32."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logz = torch.logsumexp(logits, dim=-1)
    lp = logits.gather(1, targets[:, None])[:, 0] - logz
    ent = None
    if entropy:
        with torch.no_grad():
            ent = logz - (logits.softmax(-1) * logits).sum(-1)
    return lp, ent


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP/FSDP/compile wrappers."""
    for attr in ("module", "_orig_mod"):
        while hasattr(model, attr) and isinstance(getattr(model, attr), nn.Module):
            model = getattr(model, attr)
    return model


def base_model(lm: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (LoRA layers in place), or `lm` itself."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


class PolicyModel(nn.Module):
    """A causal LM (full or PEFT) and, for PPO, a value head on its last hidden state."""

    def __init__(self, lm: nn.Module, value_head: bool = False):
        super().__init__()
        self.lm = lm
        self.v_head = None
        if value_head:
            hidden = base_model(lm).config.hidden_size
            self.v_head = nn.Linear(hidden, 1)
            nn.init.normal_(self.v_head.weight, std=1 / (hidden + 1) ** 0.5)
            nn.init.zeros_(self.v_head.bias)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, keep: torch.Tensor,
                value_positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits at `keep` (N, V), values at `value_positions` in fp32 or None)."""
        want_values = self.v_head is not None and value_positions is not None
        if input_ids.shape[0] == 1:  # one packed row: the model computes logits at `keep` only
            out = self.lm(input_ids=input_ids, position_ids=position_ids, logits_to_keep=keep, use_cache=False,
                          output_hidden_states=want_values)
            logits, h = out.logits[0], out.hidden_states[-1][0] if want_values else None
        else:  # padded rows: flat positions of the backbone's output, then the head (Llama-family: a plain lm_head)
            base = base_model(self.lm)
            h = getattr(base, base.base_model_prefix)(input_ids=input_ids, position_ids=position_ids,
                                                      use_cache=False).last_hidden_state.flatten(0, 1)
            logits = base.get_output_embeddings()(h[keep])
        values = None
        if want_values:
            values = self.v_head(h[value_positions].to(self.v_head.weight.dtype)).squeeze(-1).float()
        return logits, values

    @contextlib.contextmanager
    def reference(self):
        """The frozen reference inside this policy: a LoRA policy with its adapter switched off."""
        with self.lm.disable_adapter():
            yield


class RewardModel(nn.Module):
    """A sequence classifier (full or PEFT) scoring each sequence at its last token that is not the pad token.

    That is where transformers' `*ForSequenceClassification` pools a padded row, so an exported reward
    model scores the same when it is loaded with AutoModelForSequenceClassification; with pad == EOS
    (SmolLM2), the token before the answer's closing EOS.
    """

    def __init__(self, seq_cls: nn.Module):
        super().__init__()
        self.lm = seq_cls

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        base = base_model(self.lm)
        backbone = getattr(base, base.base_model_prefix)
        h = backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        pad = base.config.pad_token_id
        if pad is not None:
            last = last - (input_ids.flatten()[last] == pad).long()
        return base.score(h.flatten(0, 1)[last]).squeeze(-1).float()


def policy_logps(model: nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0, entropy: bool = False,
                 values: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(answer-token log-probs (N,), entropies or None, values or None) of a packed row under a PolicyModel."""
    device = next(model.parameters()).device
    logits, v = model(batch["input_ids"].to(device), batch["position_ids"].to(device), batch["keep"].to(device),
                      batch["value_positions"].to(device) if values else None)
    lp, ent = token_logps(logits, batch["targets"].to(device), temperature, entropy)
    return lp, ent, v


def reward_scores(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One score per sequence of a packed row under a RewardModel."""
    device = next(model.parameters()).device
    return model(batch["input_ids"].to(device), batch["position_ids"].to(device), batch["last"].to(device))
