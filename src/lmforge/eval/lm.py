"""The evaluated model: log-likelihoods of continuations and greedy generation, tokenized as lm-eval's `hf` does.

Scores equal lm-eval's (tests/test_eval_tasks.py) but cost less. A multiple-choice question's context
runs once for all its choices: one row holds the context and every choice, and an attention mask lets
each choice see only the context and itself (lm-eval runs one row per choice). Only the positions that
predict a continuation token go through the output head. Llama, Mistral and Qwen2 layouts run on the
inference runner (fused, prepacked weights); other models run through transformers, one row per request.
Generation goes through lmforge.infer's Generator (the continuous-batching engine, stop strings).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.errors import UserError
from lmforge.eval.perplexity import rolling_windows
from lmforge.infer import Generator, InferenceModel, Runner, SamplingParams, load_for_inference

HEAD_ROWS = 1024  # positions per output-head chunk: bounds the (rows, vocab) logits in memory
# Tokens per scoring pass. On CPU small batches win (activations stay in cache: 2,048 scored a 200-question
# task 15 % faster than 8,192); a GPU wants big ones.
BATCH_TOKENS = {"cpu": 2048, "cuda": 16384}


@dataclass
class _Group:
    """One row: a context and the continuations scored after it (indices into the request list)."""
    context: list[int]
    items: list[tuple[int, list[int]]]

    @property
    def length(self) -> int:
        return len(self.context) + sum(len(c) - 1 for _, c in self.items)


class EvalModel:
    """A loaded model and tokenizer with lm-eval's request semantics; `load` builds one from a model spec."""

    def __init__(self, m: InferenceModel, max_length: int | None = None, batch_tokens: int | None = None):
        self.m = m
        self.max_length = max_length or m.max_positions
        self.batch_tokens = batch_tokens or BATCH_TOKENS.get(m.device.type, 4096)
        self.fast = m.runner_supported
        self._runner: Runner | None = None
        self._generator: Generator | None = None
        self.prefix_token_id = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id

    @property
    def model(self):
        return self.m.model

    @property
    def tok(self):
        return self.m.tokenizer

    @property
    def device(self):
        return self.m.device

    @property
    def dtype(self):
        return self.m.dtype

    @classmethod
    def load(cls, spec: str, device: str = "auto", max_length: int | None = None, batch_tokens: int | None = None,
             dtype: str = "auto"):
        """The model of `spec` on the inference dtype policy: float32 on CPU, bfloat16 on CUDA, unless `dtype`."""
        return cls(load_for_inference(spec, device, dtype), max_length, batch_tokens)

    # ---- tokenization (lm-eval's TemplateLM) -------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """The tokenizer's default special tokens, unless the text already starts with BOS (lm-eval's tok_encode)."""
        bos = self.tok.bos_token
        if bos and text.startswith(bos):
            return self.tok.encode(text, add_special_tokens=False)
        return self.tok.encode(text)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids: trailing context spaces move to the continuation, and the continuation is
        the tail of the whole string's tokens (so a merge across the boundary is tokenized as in the text)."""
        if not context:
            cont = self.tok.encode(continuation, add_special_tokens=False)
            return ([self.prefix_token_id], cont) if cont[:1] != [self.prefix_token_id] else (cont[:1], cont[1:])
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]

    # ---- log-likelihood ----------------------------------------------------------------------
    def loglikelihood(self, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding would produce it) per request.

        Like lm-eval, an input longer than max_length keeps its last max_length tokens."""
        groups: dict[tuple[int, ...], _Group] = {}
        for i, (ctx, cont) in enumerate(requests):
            if not cont:
                raise UserError(f"request {i}: the continuation is empty")
            if len(cont) > self.max_length:
                raise UserError(f"request {i}: a {len(cont)}-token continuation is longer than the "
                                 f"{self.max_length}-token window")
            full = (ctx + cont)[-(self.max_length + 1):]
            key = tuple(full[: len(full) - len(cont)])
            groups.setdefault(key, _Group(list(key), [])).items.append((i, cont))
        rows = []
        for g in groups.values():
            # sharing saves (k-1) context passes but lengthens the row and needs an explicit mask: worth it when the
            # context outweighs the continuations (a question and its choices), not for perplexity's 1-token prefix
            mean_cont = sum(len(c) for _, c in g.items) / len(g.items)
            if self.fast and len(g.items) > 1 and len(g.context) >= mean_cont:
                rows.append(g)
            else:
                rows += [_Group(g.context, [it]) for it in g.items]
        rows.sort(key=lambda g: -g.length)  # similar lengths share a batch: little padding
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        with torch.inference_mode():
            start = 0
            while start < len(rows):
                end = start + 1
                while end < len(rows) and (end - start + 1) * rows[start].length <= self.batch_tokens \
                        and rows[end].length * 4 >= rows[start].length * 3:  # padding stays under a quarter
                    end += 1
                for i, result in self._score(rows[start:end]):
                    out[i] = result
                start = end
        return out

    def loglikelihood_rolling(self, texts: list[str], stride: int | None = None) -> list[tuple[float, int]]:
        """(log-likelihood, tokens) of each whole text over rolling windows of max_length (lm-eval's
        loglikelihood_rolling; `stride` tokens predicted per window, default max_length)."""
        windows, owner = [], []
        for i, text in enumerate(texts):
            for w in rolling_windows(self.tok.encode(text, add_special_tokens=False), self.prefix_token_id,
                                     self.max_length, stride or self.max_length):
                windows.append(w)
                owner.append(i)
        totals = [[0.0, 0] for _ in texts]
        for i, (ll, _), (_, cont) in zip(owner, self.loglikelihood(windows), windows):
            totals[i][0] += ll
            totals[i][1] += len(cont)
        return [(ll, n) for ll, n in totals]

    def _score(self, rows: list[_Group]):
        """(request index, (loglikelihood, is_greedy)) for every continuation in a batch of rows."""
        width = rows[0].length
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        pos = torch.zeros(len(rows), width, dtype=torch.long)
        shared = any(len(g.items) > 1 for g in rows)
        mask = torch.zeros(len(rows), 1, width, width, dtype=torch.bool) if shared else None
        picks, targets, spans = [], [], []  # flat (row, position) that predicts each target token
        for r, g in enumerate(rows):
            n = len(g.context)
            ids[r, :n] = torch.tensor(g.context)
            pos[r, :n] = torch.arange(n)
            if mask is not None:
                mask[r, 0, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
            at = n
            for i, cont in g.items:
                body = cont[:-1]  # the last token is predicted, never fed
                ids[r, at: at + len(body)] = torch.tensor(body, dtype=torch.long)
                pos[r, at: at + len(body)] = torch.arange(n, n + len(body))
                if mask is not None:
                    mask[r, 0, at: at + len(body), :n] = True
                    mask[r, 0, at: at + len(body), at: at + len(body)] = torch.ones(len(body), len(body),
                                                                                 dtype=torch.bool).tril()
                first = len(picks)
                picks += [(r, n - 1)] + [(r, p) for p in range(at, at + len(body))]
                targets += cont
                spans.append((i, first, len(picks)))
                at += len(body)
        if mask is not None:  # padding rows attend to themselves only, so softmax never sees an all-False row
            pad = ~mask.any(-1, keepdim=True)
            mask |= pad & torch.eye(width, dtype=torch.bool)
        lengths = [g.length for g in rows]
        h = self._hidden(ids.to(self.device), pos.to(self.device), None if mask is None else mask.to(self.device),
                         lengths)
        rr = torch.tensor([p[0] for p in picks], device=self.device)
        cc = torch.tensor([p[1] for p in picks], device=self.device)
        tgt = torch.tensor(targets, device=self.device)
        lps, greedy = [], []
        for a in range(0, len(picks), HEAD_ROWS):
            logits = self._logits(h[rr[a: a + HEAD_ROWS], cc[a: a + HEAD_ROWS]])
            t = tgt[a: a + HEAD_ROWS]
            lps.append(logits.gather(1, t[:, None])[:, 0] - torch.logsumexp(logits, dim=-1))
            greedy.append(logits.argmax(-1) == t)
        lp, gr = torch.cat(lps).tolist(), torch.cat(greedy).tolist()
        for i, a, b in spans:
            yield i, (float(sum(lp[a:b])), all(gr[a:b]))

    def _hidden(self, ids, pos, mask, lengths):
        if self.fast:
            if self._runner is None:
                self._runner = Runner(self.model, max_slots=1, max_len=self.max_length)
            return self._runner.hidden(ids, pos, mask)
        attention = (torch.arange(ids.shape[1])[None, :] < torch.tensor(lengths)[:, None]).long()
        out = self.model.base_model(input_ids=ids, attention_mask=attention.to(self.device), position_ids=pos)
        return out.last_hidden_state

    def _logits(self, h):
        if self.fast:
            return self._runner.logits(h)
        return self.model.get_output_embeddings()(h).float()

    # ---- generation --------------------------------------------------------------------------
    def generate_until(self, contexts: list[str], until: list[str], max_gen_toks: int = 256,
                       sampling: dict | None = None, n: int = 1, seed: int = 1234) -> list[str]:
        """Continuations of each context, cut before the first stop string or EOS (lm-eval's generate_until):
        greedy, or `n` per context sampled with `sampling` (temperature, top_p, top_k), context by context.

        The context keeps its last max_length - max_gen_toks tokens, as lm-eval's `hf` model does. Context i's
        samples are seeded with seed + i, so a run repeats exactly."""
        if max_gen_toks >= self.max_length:
            raise UserError(f"max_gen_toks {max_gen_toks} must be less than the {self.max_length}-token window")
        keep = self.max_length - max_gen_toks
        prompts = [self.encode(c)[-keep:] for c in contexts]
        if self._generator is None:  # one request per row on transformers' path, as lm-eval's `hf` runs them
            self._generator = Generator(self.m, max_batch=32, max_model_len=self.max_length,
                                        max_prefill_tokens=4096, fallback_batch=1)
        stop = [u for u in until if u]
        if sampling is None:
            params = SamplingParams(max_tokens=max_gen_toks, temperature=0.0, stop=stop)
            return [c.text for c in self._generator.generate(prompts, params) for _ in range(n)]
        params = [SamplingParams(max_tokens=max_gen_toks, n=n, seed=seed + i, stop=stop, **sampling)
                  for i in range(len(prompts))]
        return [c.text for c in self._generator.generate(prompts, params)]

    def chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The messages through the tokenizer's chat template (lm-eval's HFLM.apply_chat_template): a generation
        prompt, or the last assistant turn left open; a template that refuses a system turn gets none."""
        import jinja2

        if not getattr(self.tok, "chat_template", None):
            raise UserError("the model's tokenizer has no chat template (drop --apply-chat-template)")
        kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt,
                      continue_final_message=not add_generation_prompt)
        try:
            return self.tok.apply_chat_template(messages, **kwargs)
        except jinja2.exceptions.TemplateError:
            return self.tok.apply_chat_template([m for m in messages if m["role"] != "system"], **kwargs)

    def close(self) -> None:
        """Stop the generation engine thread, if one started."""
        if self._generator is not None:
            self._generator.close()
            self._generator = None
