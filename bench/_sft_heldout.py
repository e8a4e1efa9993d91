"""Held-out loss for bench/finetune_cpu.py: the one function both sides' adapters are scored with.

For each Alpaca record: prompt = the standard Alpaca template, completion = output + EOS. The
sequence is tokenize(prompt + output) followed by the EOS id (no BOS: SmolLM2's tokenizer adds
none); loss positions are the tokens after the longest common prefix of tokenize(prompt) and
tokenize(prompt + output) (same rule as TRL), i.e. the response tokens and the EOS. Sequences are
truncated to max_length. The score is the token-weighted mean cross-entropy over all loss
positions of the held-out set, in fp32, on the base model from the HF directory with the adapter
applied by `PeftModel.from_pretrained` and merged (or the bare base for "base").

    python bench/_sft_heldout.py --hf DIR --data alpaca.json --start 4800 NAME=ADAPTER_DIR ... [base=]
Prints one JSON object {name: {"loss": ..., "tokens": ..., "examples": ...}}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def alpaca_prompt(rec: dict) -> str:
    if rec.get("input"):
        return PROMPT_INPUT.format(instruction=rec["instruction"], input=rec["input"])
    return PROMPT_NO_INPUT.format(instruction=rec["instruction"])


def encode(tok, rec: dict, max_length: int) -> tuple[list[int], int]:
    """(ids, first loss position): ids = tokens of prompt+output, then EOS; loss on ids[start:]."""
    prompt = alpaca_prompt(rec)
    p_ids = tok(prompt)["input_ids"]
    ids = tok(prompt + rec["output"])["input_ids"] + [tok.eos_token_id]
    start = 0
    while start < len(p_ids) and p_ids[start] == ids[start]:
        start += 1
    return ids[:max_length], start


def heldout_loss(model, tok, records: list[dict], max_length: int = 512, batch: int = 8) -> dict:
    """Token-weighted mean CE over response+EOS tokens of `records` (fp32, no grad)."""
    import torch

    enc = sorted((encode(tok, r, max_length) for r in records), key=lambda e: len(e[0]))
    enc = [e for e in enc if e[1] < len(e[0])]  # drop anything whose response was truncated away
    total, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(enc), batch):
            chunk = enc[i:i + batch]
            L = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), L), tok.eos_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), L), dtype=torch.long)
            labels = torch.full((len(chunk), L), -100, dtype=torch.long)
            for j, (ids, start) in enumerate(chunk):
                input_ids[j, :len(ids)] = torch.tensor(ids)
                mask[j, :len(ids)] = 1
                labels[j, start:len(ids)] = torch.tensor(ids[start:])
            # Decoder once, LM head only where there is a target (the loss is the same, the head's
            # cost on prompt positions is saved).
            hidden = model.model(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
            tgt = labels[:, 1:]
            keep = tgt != -100
            logits = model.lm_head(hidden[:, :-1][keep]).float()
            total += torch.nn.functional.cross_entropy(logits, tgt[keep], reduction="sum").item()
            count += int((labels[:, 1:] != -100).sum())
    return {"loss": total / count, "tokens": count, "examples": len(enc)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--hf", required=True)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--start", required=True, type=int, help="held-out records are data[start:]")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("models", nargs="+", help="NAME=ADAPTER_DIR, or NAME= for the untrained base")
    a = p.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.hf)
    records = json.loads(a.data.read_text())[a.start:]
    out = {}
    for spec in a.models:
        name, _, adapter = spec.partition("=")
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(a.hf, dtype=torch.float32)
        if adapter:  # merged into the fp32 weights: the same function as the unmerged adapter, faster
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        out[name] = heldout_loss(model, tok, records, a.max_length)
        out[name]["eval_s"] = round(time.perf_counter() - t0, 1)
        print(f"held-out {name}: {out[name]}", file=sys.stderr)
        del model
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
