"""Prompts in, each model's answers out: generated once, batched, and cached in OUT_DIR/answers.jsonl.

An answer is keyed by the model spec, the prompt's hash and the generation settings, so a rerun
generates nothing, and a new model, prompt or setting generates only what is missing. Generation is
lmforge.infer's Generator: the continuous-batching engine for Llama, Mistral and Qwen2, transformers'
`generate` on left-padded batches for others.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lmforge.errors import UserError

HF_BATCH = 8  # prompts per transformers `generate` call, for architectures the engine does not cover


@dataclass(frozen=True)
class Prompt:
    """One prompt: an instruction and an optional input (Alpaca's fields); `id` is a hash of both."""
    id: str
    instruction: str
    input: str = ""

    @property
    def text(self) -> str:
        """What the voter reads and a chat model receives as its user turn."""
        return f"{self.instruction}\n\n{self.input}" if self.input.strip() else self.instruction


@dataclass(frozen=True)
class Settings:
    """How answers are generated; part of every cache key. temperature 0 is greedy decoding."""
    max_new_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    template: str = "chat"  # chat | alpaca | none

    def key(self) -> str:
        d = asdict(self)
        if self.temperature <= 0:  # greedy answers do not depend on the seed
            d["seed"] = None
        return json.dumps(d, sort_keys=True)


def make_prompt(instruction: str, inp: str = "") -> Prompt:
    digest = hashlib.sha256(json.dumps([instruction, inp]).encode()).hexdigest()[:16]
    return Prompt(digest, instruction, inp)


def _from_record(record, where: str) -> Prompt:
    if isinstance(record, str):
        return make_prompt(record)
    if isinstance(record, dict):
        text = record.get("prompt", record.get("instruction"))
        inp = record.get("input") or ""
        if isinstance(text, str) and text.strip() and isinstance(inp, str):
            return make_prompt(text, "" if "prompt" in record else inp)
    raise UserError(f"{where}: expected an object with a `prompt` or an `instruction` (+ `input`) string")


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from .jsonl (`prompt`, or `instruction` + `input`, per line), .json (a list of those, e.g. Alpaca's
    file) or .txt (one prompt per line); duplicates are dropped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        prompts = [make_prompt(line.strip()) for line in text.splitlines() if line.strip()]
    elif path.suffix == ".jsonl":
        prompts = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise UserError(f"{path}:{i}: not JSON ({e})") from None
                prompts.append(_from_record(record, f"{path}:{i}"))
    elif path.suffix == ".json":
        try:
            records = json.loads(text)
        except ValueError as e:
            raise UserError(f"{path}: not JSON ({e})") from None
        if not isinstance(records, list):
            raise UserError(f"{path}: expected a JSON list of prompts")
        prompts = [_from_record(r, f"{path}[{i}]") for i, r in enumerate(records)]
    else:
        raise UserError(f"--prompts {path}: expected a .jsonl, .json or .txt file")
    unique = list({p.id: p for p in prompts}.values())
    if not unique:
        raise UserError(f"--prompts {path}: no prompts in the file")
    return unique


def load_cache(path: Path) -> dict[tuple[str, str, str], str]:
    """(model, prompt id, settings key) -> answer for every readable line of answers.jsonl."""
    cache = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
                cache[(r["model"], r["prompt_id"], json.dumps(r["settings"], sort_keys=True))] = r["answer"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash: that answer is generated again
    return cache


def generate_answers(model, tok, prompts: list[Prompt], s: Settings, engine: bool | None = None) -> list[str]:
    """One answer per prompt from a loaded model; engine None: the engine when it supports the model."""
    from lmforge.infer import Generator, InferenceModel, SamplingParams, prompt_ids

    ids = [prompt_ids(tok, p.instruction if s.template == "alpaca" else p.text, s.template, p.input)
           for p in prompts]
    # each prompt samples from its own seed, so its answer does not depend on what else is generated
    params = [SamplingParams(max_tokens=s.max_new_tokens, temperature=s.temperature,
                             seed=(s.seed + int(p.id, 16)) % 2**63 if s.temperature > 0 else None) for p in prompts]
    m = InferenceModel.of(model, tok)
    with Generator(m, max_batch=max(1, min(len(ids), 32)), fallback_batch=HF_BATCH, engine=engine) as g:
        return [c.text for c in g.generate(ids, params)]


def ensure_answers(models: list[str], prompts: list[Prompt], s: Settings, cache_path: Path,
                   device: str = "auto", dtype: str = "auto") -> tuple[dict[tuple[str, str], str], int, int]:
    """Every model's answer to every prompt, generating only those not in the cache file (appended to it).

    Returns ({(model, prompt id): answer}, generated, reused).
    """
    cache = load_cache(cache_path)
    key = s.key()
    answers, generated = {}, 0
    for model_spec in models:
        missing = [p for p in prompts if (model_spec, p.id, key) not in cache]
        if missing:
            texts = _generate_for(model_spec, missing, s, device, dtype)
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            with open(cache_path, "a", encoding="utf-8") as f:
                for p, text in zip(missing, texts):
                    f.write(json.dumps({"model": model_spec, "prompt_id": p.id, "settings": json.loads(key),
                                        "prompt": p.text, "answer": text}) + "\n")
                    cache[(model_spec, p.id, key)] = text
            generated += len(missing)
        for p in prompts:
            answers[(model_spec, p.id)] = cache[(model_spec, p.id, key)]
    return answers, generated, len(answers) - generated


def _generate_for(model_spec: str, prompts: list[Prompt], s: Settings, device: str, dtype: str) -> list[str]:
    import gc

    import torch

    from lmforge.infer import load_for_inference

    started = time.monotonic()
    m = load_for_inference(model_spec, device, dtype)
    texts = generate_answers(m.model, m.tokenizer, prompts, s)
    cuda = m.device.type == "cuda"
    del m
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    print(f"{model_spec}: {len(prompts)} answers generated in {time.monotonic() - started:.1f} s", flush=True)
    return texts
