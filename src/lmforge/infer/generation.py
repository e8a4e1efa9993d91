"""Offline generation for every command: `Generator` over any loaded model, and `lmforge generate` / `lmforge chat`.

A model spec is an alias (smollm2-135m-instruct), a .gguf file, an HF model or checkpoint directory, a
run's out_dir (its latest checkpoint), a LoRA adapter directory, or a hub id; see lmforge.model.load.
Llama, Mistral and Qwen2 models generate through the continuous-batching engine (every sequence with
its own seeded generator, as `lmforge serve` samples); other architectures through transformers'
`generate` (infer/fallback.py).
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lmforge.errors import UserError
from lmforge.infer.engine import Completion, Engine, SamplingParams, run_batch
from lmforge.infer.fallback import hf_generate
from lmforge.infer.load import InferenceModel, load_for_inference
from lmforge.infer.prompts import Template, chat_ids, document_start, prompt_ids
from lmforge.tokens.chat import alpaca_template


class Generator:
    """Generate from a loaded model: the engine where the runner covers the architecture, else transformers.

    The engine thread starts at the first call and runs with this thread's CPU thread count; `close()` stops
    it. Its prefill budget grows to the longest prompt seen, so a batch of long prompts is prefilled together.
    """

    def __init__(self, m: InferenceModel, *, max_batch: int = 32, max_model_len: int | None = None,
                 max_prefill_tokens: int = 1024, fallback_batch: int = 8, engine: bool | None = None):
        self.m = m
        self.max_model_len = max_model_len or m.max_positions
        self.use_engine = m.runner_supported if engine is None else engine
        self.max_batch, self.max_prefill_tokens, self.fallback_batch = max_batch, max_prefill_tokens, fallback_batch
        self._engine: Engine | None = None

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 on_text: Callable[[str], None] | None = None) -> list[Completion]:
        """Each prompt's `params.n` completions, prompt by prompt; `on_text` streams a single prompt's text.

        A prompt as long as the context window is an error; `max_tokens` is cut to the room that is left."""
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        for k, (ids, p) in enumerate(zip(prompts, params)):
            room = self.max_model_len - len(ids)
            if room <= 0:
                raise UserError(f"prompt {k + 1} is {len(ids)} tokens, as long as the model's context "
                                 f"({self.max_model_len}); shorten it")
            if p.max_tokens > room:
                params[k] = dataclasses.replace(p, max_tokens=room)
        if not prompts:
            return []
        if not self.use_engine:
            return hf_generate(self.m.model, self.m.tokenizer, prompts, params, self.m.eos_ids,
                               batch_size=self.fallback_batch, on_text=on_text)
        engine = self._start(max(map(len, prompts)))
        on_event = None if on_text is None else (lambda _, ev: ev.text and on_text(ev.text))
        return run_batch(engine, list(zip(prompts, params)), on_event)

    def _start(self, longest_prompt: int) -> Engine:
        if self._engine is None:
            self._engine = Engine(self.m.model, self.m.tokenizer, self.m.eos_ids, max_batch=self.max_batch,
                                  max_queue=1 << 30, max_model_len=self.max_model_len,
                                  max_prefill_tokens=self.max_prefill_tokens, threads=torch.get_num_threads())
            self._engine.start()
        self._engine.max_prefill_tokens = max(self._engine.max_prefill_tokens, longest_prompt)
        return self._engine

    def close(self) -> None:
        """Stop the engine thread, if one started."""
        if self._engine is not None:
            self._engine.stop()
            self._engine = None

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Sample:
    """One sample: `text` (prompt + continuation, or only the reply with a chat template), how many tokens were
    generated (EOS included), and whether it ended with EOS (False: it hit max_new_tokens)."""
    text: str
    n_tokens: int
    finished: bool


def sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None, seed: int | None,
             n: int = 1) -> SamplingParams:
    """The engine's parameters for the generate/chat settings (top_k None or 0 and top_p None: off)."""
    return SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k or 0,
                          top_p=1.0 if top_p is None else top_p, seed=seed, n=n)


def generate_samples(model_path: str | Path, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8,
                     top_k: int | None = 200, num_samples: int = 1, seed: int = 1337, device: str = "auto",
                     top_p: float | None = None, template: Template = "none", inp: str = "",
                     dtype: str = "auto") -> list[Sample]:
    """Sample `num_samples` continuations of `prompt` in `template`, each stopping at EOS.

    The text is the prompt as rendered plus the continuation, or only the reply with the chat template."""
    m = load_for_inference(model_path, device, dtype)
    tok = m.tokenizer
    ids = document_start(tok) if not prompt and template == "none" else prompt_ids(tok, prompt, template, inp)
    head = {"chat": "", "alpaca": alpaca_template(prompt, inp)}.get(template, prompt)
    with Generator(m, max_batch=max(32, num_samples), fallback_batch=max(8, num_samples)) as g:
        done = g.generate([ids], sampling(max_new_tokens, temperature, top_k, top_p, seed, num_samples))
    return [Sample(head + c.text, len(c.token_ids), c.finish_reason == "stop") for c in done]


def generate(model_path: str | Path, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8,
             top_k: int | None = 200, num_samples: int = 1, seed: int = 1337, device: str = "auto",
             top_p: float | None = None, template: Template = "none", inp: str = "", dtype: str = "auto") -> list[str]:
    """The texts of generate_samples."""
    return [s.text for s in generate_samples(model_path, prompt, max_new_tokens, temperature, top_k, num_samples,
                                             seed, device, top_p, template, inp, dtype)]


def chat(spec: str | Path, *, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.7,
         top_p: float | None = 0.9, top_k: int | None = None, seed: int = 1337, device: str = "auto",
         dtype: str = "auto", input=sys.stdin, output=sys.stdout) -> list[dict]:
    """Chat in the terminal: `you> ` lines in, streamed `assistant> ` replies out; /reset clears the history,
    /exit or EOF quits. Returns the conversation as it stands at exit.

    Turn t samples with seed + t, so a conversation replays the same with the same seed."""
    m = load_for_inference(spec, device, dtype)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    output.write(f"chatting with {spec}; /reset clears the history, /exit quits\n")

    def stream(text: str) -> None:
        output.write(text)
        output.flush()

    with Generator(m, max_batch=1, fallback_batch=1) as g:
        turn = 0
        while True:
            output.write("you> ")
            output.flush()
            line = input.readline()
            if not line:
                output.write("\n")
                return messages
            line = line.strip()
            if not input.isatty():  # piped input: echo it, so the transcript reads like a terminal session
                output.write(line + "\n")
            if line == "/exit":
                return messages
            if line == "/reset":
                messages = list(start)
                output.write("(history cleared)\n")
                continue
            if not line:
                continue
            messages.append({"role": "user", "content": line})
            output.write("assistant> ")
            [reply] = g.generate([chat_ids(m.tokenizer, messages)],
                                 sampling(max_new_tokens, temperature, top_k, top_p, seed + turn), on_text=stream)
            turn += 1
            output.write("\n" if reply.finish_reason == "stop" else f"\n[cut off at max_new_tokens={max_new_tokens}]\n")
            messages.append({"role": "assistant", "content": reply.text.strip()})
