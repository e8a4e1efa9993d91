"""Prompts in, each model's answers out: generated once, batched, and cached in OUT_DIR/answers.jsonl.

An answer is keyed by the model spec, the prompt's hash and the generation settings, so a rerun
generates nothing, and a new model, prompt or setting generates only what is missing. Llama, Mistral
and Qwen2 models generate through the serving engine (continuous batching); others through
transformers' `generate` on left-padded batches.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HF_BATCH = 8  # prompts per `generate` call on the fallback path


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
    raise ValueError(f"{where}: expected an object with a `prompt` or an `instruction` (+ `input`) string")


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
                    raise ValueError(f"{path}:{i}: not JSON ({e})") from None
                prompts.append(_from_record(record, f"{path}:{i}"))
    elif path.suffix == ".json":
        try:
            records = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of prompts")
        prompts = [_from_record(r, f"{path}[{i}]") for i, r in enumerate(records)]
    else:
        raise ValueError(f"--prompts {path}: expected a .jsonl, .json or .txt file")
    unique = list({p.id: p for p in prompts}.values())
    if not unique:
        raise ValueError(f"--prompts {path}: no prompts in the file")
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


def _prompt_ids(tok, prompt: Prompt, template: str) -> list[int]:
    if template == "chat":
        text = tok.apply_chat_template([{"role": "user", "content": prompt.text}], add_generation_prompt=True,
                                       tokenize=False)
        return tok.encode(text, add_special_tokens=False)
    if template == "alpaca":
        from lmforge.train.sft_data import alpaca_template
        return tok.encode(alpaca_template(prompt.instruction, prompt.input))
    return tok.encode(prompt.text)


def _with_engine(model, tok, stops: list[int], ids: list[list[int]], seeds: list[int], s: Settings) -> list[str]:
    """Answers through the continuous-batching engine: all prompts queued at once."""
    import torch

    from lmforge.serve.engine import Engine, SamplingParams, run_batch

    engine = Engine(model, tok, stops, max_batch=min(len(ids), 32), max_queue=len(ids),
                    threads=torch.get_num_threads())  # the engine thread uses the caller's CPU thread count
    requests = []
    for k, p in enumerate(ids):
        room = engine.max_model_len - len(p)
        if room <= 0:
            raise ValueError(f"prompt {k + 1} is {len(p)} tokens, as long as the model's context "
                             f"({engine.max_model_len}); shorten it")
        requests.append((p, SamplingParams(max_tokens=min(s.max_new_tokens, room), temperature=s.temperature,
                                           seed=seeds[k] if s.temperature > 0 else None)))
    engine.start()
    try:
        return run_batch(engine, requests)
    finally:
        engine.stop()


def _with_generate(model, tok, stops: list[int], ids: list[list[int]], seeds: list[int], s: Settings) -> list[str]:
    """Answers through transformers' `generate`, left-padded batches of HF_BATCH prompts."""
    import torch

    dev = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else (stops or [0])[0]
    greedy = s.temperature <= 0
    out = []
    for start in range(0, len(ids), HF_BATCH):
        chunk = ids[start:start + HF_BATCH]
        width = max(map(len, chunk))
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=dev)
        torch.manual_seed(seeds[start])
        with torch.no_grad():
            gen = model.generate(input_ids, attention_mask=mask, max_new_tokens=s.max_new_tokens,
                                 do_sample=not greedy, temperature=None if greedy else s.temperature,
                                 top_k=None, top_p=None, eos_token_id=stops or None, pad_token_id=pad)
        for row in gen[:, width:].tolist():
            end = next((i for i, t in enumerate(row) if t in stops), len(row))
            out.append(tok.decode(row[:end], skip_special_tokens=True))
    return out


def generate_answers(model, tok, prompts: list[Prompt], s: Settings, engine: bool | None = None) -> list[str]:
    """One answer per prompt from a loaded model; engine None: the engine when it supports the model."""
    from lmforge.generate import eos_ids
    from lmforge.serve.runner import check_supported

    ids = [_prompt_ids(tok, p, s.template) for p in prompts]
    # the engine samples each prompt from its own seed, so its answer does not depend on what else is generated
    seeds = [(s.seed + int(p.id, 16)) % 2**63 for p in prompts]
    if engine is None:
        try:
            check_supported(model.config)
            engine = True
        except ValueError:
            engine = False
    return (_with_engine if engine else _with_generate)(model, tok, eos_ids(model, tok), ids, seeds, s)


def ensure_answers(models: list[str], prompts: list[Prompt], s: Settings, cache_path: Path,
                   device: str = "auto") -> tuple[dict[tuple[str, str], str], int, int]:
    """Every model's answer to every prompt, generating only those not in the cache file (appended to it).

    Returns ({(model, prompt id): answer}, generated, reused).
    """
    cache = load_cache(cache_path)
    key = s.key()
    answers, generated = {}, 0
    for model_spec in models:
        missing = [p for p in prompts if (model_spec, p.id, key) not in cache]
        if missing:
            texts = _generate_for(model_spec, missing, s, device)
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


def _generate_for(model_spec: str, prompts: list[Prompt], s: Settings, device: str) -> list[str]:
    import gc

    import torch

    from lmforge.model.load import load_model, load_tokenizer
    from lmforge.device import pick_device

    started = time.monotonic()
    dev = pick_device(device)
    tok = load_tokenizer(model_spec)
    model = load_model(model_spec, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32, device=dev,
                       merge_adapter=True).eval()
    texts = generate_answers(model, tok, prompts, s)
    del model
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    print(f"{model_spec}: {len(prompts)} answers generated in {time.monotonic() - started:.1f} s", flush=True)
    return texts
