"""`lmforge eval tasks --bridge lm-eval`: any lm-evaluation-harness task, run by lm-eval on the model lmforge loaded.

lm-eval builds the prompts and computes the metrics; lmforge answers its requests (log-likelihoods,
rolling log-likelihoods, greedy generation) with EvalModel, so adapters, GGUF files and runs load
the same way as everywhere else in lmforge. Needs the `eval` extra (lm-eval).
"""
from __future__ import annotations

from pathlib import Path

from lmforge.errors import UserError
from lmforge.eval import tasks as T
from lmforge.eval.harness import logged_arguments, strings
from lmforge.eval.lm import EvalModel


def lm_eval_model(em: EvalModel):
    """An lm-eval `TemplateLM` whose requests EvalModel answers."""
    from lm_eval.api.model import TemplateLM

    class LmforgeLM(TemplateLM):
        def __init__(self):
            super().__init__()
            self.tokenizer = em.tok

        @property
        def eot_token_id(self) -> int:
            return em.tok.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            return em.prefix_token_id

        @property
        def max_length(self) -> int:
            return em.max_length

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            if add_special_tokens is None:
                return em.encode(string)
            return em.tok.encode(string, add_special_tokens=add_special_tokens)

        def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
            return em.tok.decode(tokens, skip_special_tokens=skip_special_tokens)

        @property
        def tokenizer_name(self) -> str:
            return em.tok.name_or_path.replace("/", "__")

        def chat_template(self, chat_template=False) -> str | None:
            return getattr(em.tok, "chat_template", None) if chat_template else None

        def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
            return em.chat(chat_history, add_generation_prompt)

        def _loglikelihood_tokens(self, requests, **kwargs):
            return em.loglikelihood([(ctx, cont) for _, ctx, cont in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            return [ll for ll, _ in em.loglikelihood_rolling([req.args[0] for req in requests])]

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out: list[str | None] = [None] * len(requests)
            groups: dict[tuple, list[int]] = {}
            for i, req in enumerate(requests):
                kwargs = dict(req.args[1])
                until = kwargs.get("until") or []
                until = (until,) if isinstance(until, str) else tuple(until)
                sampling = T.sampling(kwargs)
                key = (until, int(kwargs.get("max_gen_toks", 256)), tuple(sorted((sampling or {}).items())))
                groups.setdefault(key, []).append(i)
            for (until, max_gen_toks, sampling), idx in groups.items():
                texts = em.generate_until([requests[i].args[0] for i in idx], list(until), max_gen_toks,
                                          sampling=dict(sampling) or None)
                for i, text in zip(idx, texts):
                    out[i] = text
            return out

    return LmforgeLM()


def task_names(specs: list[str]) -> tuple[list[str], list[str]]:
    """(lm-eval task names, include paths): a YAML path becomes its `task` name plus its directory."""
    names, include = [], []
    for spec in specs:
        path = Path(spec)
        if path.suffix in (".yaml", ".yml"):
            names.append(str(T.read_task_yaml(path).get("task") or path.stem))
            if str(path.resolve().parent) not in include:
                include.append(str(path.resolve().parent))
        else:
            names.append(spec)
    return names, include


def lm_eval_tasks(specs: list[str], include_path: list[Path] | None = None):
    """(task names, lm-eval TaskManager) for names or YAML paths; unknown tasks fail here, before a model loads."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("--bridge lm-eval needs lm-eval: pip install 'lmforge[eval]'") from None
    names, include = task_names(specs)
    include += [str(Path(p).resolve()) for p in include_path or []]
    manager = TaskManager(include_path=include or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UserError(f"lm-eval does not know task(s) {', '.join(unknown)}")
    return names, manager


def evaluate_with_lm_eval(em: EvalModel, names: list[str], manager, *, limit: float | None = None,
                          num_fewshot: int | None = None, system_instruction: str | None = None,
                          apply_chat_template: bool = False, multiturn: bool = False, bootstrap_iters: int = 100_000,
                          confirm_run_unsafe_code: bool = False, samples: dict | None = None) -> dict[str, dict]:
    """Run the tasks through lm-eval's simple_evaluate; {task: {metric: value, ...}} in lmforge's result shape
    (groups included); with `samples`, lm-eval's per-document records go to samples[task]."""
    from lm_eval import simple_evaluate

    res = simple_evaluate(model=lm_eval_model(em), tasks=names, num_fewshot=num_fewshot, limit=limit,
                          task_manager=manager, log_samples=samples is not None,
                          system_instruction=system_instruction, apply_chat_template=apply_chat_template,
                          fewshot_as_multiturn=multiturn, bootstrap_iters=bootstrap_iters,
                          confirm_run_unsafe_code=confirm_run_unsafe_code)
    if samples is not None:
        for task, records in (res.get("samples") or {}).items():
            samples[task] = [_as_logged(r) for r in records]
    results = {}
    for task, metrics in res["results"].items():
        r = {"n_samples": res.get("n-samples", {}).get(task, {}).get("effective"),
             "num_fewshot": res.get("n-shot", {}).get(task)}
        for key, value in metrics.items():
            if key not in ("alias", "sample_len") and isinstance(value, (int, float)):
                r[key.removesuffix(",none")] = value
        results[task] = r
    return results


def _as_logged(record: dict) -> dict:
    """An lm-eval sample record as its --log_samples file holds it (EvaluationTracker.save_results_samples):
    arguments as gen_args_i/arg_j, responses with every leaf a string, the target a string."""
    return {**record, "target": str(record["target"]), "resps": strings(record["resps"]),
            "filtered_resps": strings(record["filtered_resps"]), "arguments": logged_arguments(record["arguments"])}
