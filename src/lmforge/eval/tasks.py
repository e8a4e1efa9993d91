"""Benchmark tasks in lm-eval's YAML format: loading, prompts, requests and metrics, the way lm-eval computes them.

A task file written for lm-evaluation-harness (`dataset_path`, `dataset_kwargs.data_files`,
`doc_to_text`, `doc_to_choice`, `doc_to_target`, `target_delimiter`, `fewshot_config`,
`generation_kwargs`, `filter_list`, `metric_list`, `!function module.fn`, `include`) runs here
unchanged and gives lm-eval's numbers: the same Jinja rendering, few-shot sampling (seed 1234),
delimiters, tokenization of context/continuation pairs, acc / acc_norm / exact_match definitions
and standard errors (tests/test_eval_tasks.py checks them against `lm_eval --model hf`).
Built-in definitions live in `builtin/` (HellaSwag, ARC, MMLU, TruthfulQA MC1, GSM8K, HumanEval).
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from lmforge.errors import UserError

BUILTIN_DIR = Path(__file__).parent / "builtin"
FEWSHOT_SEED = 1234  # lm-eval's default --fewshot_random_seed
OUTPUT_TYPES = ("multiple_choice", "generate_until", "loglikelihood", "loglikelihood_rolling")
DEFAULT_METRICS = {"multiple_choice": ["acc", "acc_norm"], "generate_until": ["exact_match"],
                   "loglikelihood": ["perplexity", "acc"],
                   "loglikelihood_rolling": ["word_perplexity", "byte_perplexity", "bits_per_byte"]}
SUPPORTED_METRICS = {"multiple_choice": {"acc", "acc_norm", "acc_bytes", "exact_match", "acc_mutual_info", "f1", "mcc"},
                     "loglikelihood": {"perplexity", "acc"},
                     "loglikelihood_rolling": {"word_perplexity", "byte_perplexity", "bits_per_byte"},
                     "generate_until": {"exact_match"}}
# Keys that only label a task or feed lm-eval features we do not need (decontamination); accepted as-is.
# (`unsafe_code` is read by `unsafe_reason`.)
INERT_KEYS = {"task_alias", "tag", "group", "metadata", "should_decontaminate", "doc_to_decontamination_query",
              "unsafe_code"}
KEYS = {"task", "dataset_path", "dataset_name", "dataset_kwargs", "training_split", "validation_split", "test_split",
        "fewshot_split", "process_docs", "doc_to_text", "doc_to_target", "doc_to_choice", "process_results",
        "description", "target_delimiter", "fewshot_delimiter", "fewshot_config", "num_fewshot", "metric_list",
        "output_type", "generation_kwargs", "repeats", "filter_list", "gen_prefix"} | INERT_KEYS


class TaskError(UserError):
    """A task definition or its data cannot be used; the message names the task and the problem."""


# ---- YAML ------------------------------------------------------------------------------------
def _import_function(ref: str, base: Path) -> Callable:
    """lm-eval's `!function utils.fn`: fn from utils.py beside the YAML file."""
    module_name, _, fn = ref.rpartition(".")
    path = base / (module_name.replace(".", "/") + ".py")
    if not module_name or not path.is_file():
        raise TaskError(f"!function {ref}: no file {path}")
    spec = importlib.util.spec_from_file_location(f"lmforge_task_{abs(hash(path))}_{module_name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, fn):
        raise TaskError(f"!function {ref}: {path} has no {fn}")
    return getattr(module, fn)


def read_task_yaml(path: Path, functions: bool = True) -> dict:
    """A task YAML as a dict: `!function` tags resolved beside the file, `include` merged underneath.

    functions=False leaves each `!function` as the string `!function REF` and imports nothing (the task index
    reads every YAML in a directory this way, so no file's code runs unless its task is evaluated)."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: no such task file")

    class Loader(yaml.SafeLoader):
        pass

    if functions:
        Loader.add_constructor("!function",
                               lambda loader, node: _import_function(loader.construct_scalar(node), path.parent))
    else:
        Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")
    try:
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader) or {}
    except yaml.YAMLError as e:
        raise TaskError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise TaskError(f"{path}: a task file must be a mapping")
    if "include" in cfg:
        base = read_task_yaml(path.parent / cfg.pop("include"), functions)
        cfg = {**base, **cfg}
    return cfg


# ---- the task ----------------------------------------------------------------------------------
@dataclass
class Task:
    """One task's configuration (lm-eval's TaskConfig fields) and where it came from."""
    name: str
    source: Path
    cfg: dict
    docs: list[dict] = field(default_factory=list)
    fewshot_pool: list[dict] | None = None
    multiple_input: bool = False  # doc_to_text gives the gold index and doc_to_choice the contexts (Winogrande)

    def get(self, key: str, default=None):
        value = self.cfg.get(key)
        return default if value is None else value

    @property
    def output_type(self) -> str:
        return self.get("output_type", "generate_until")

    @property
    def fewshot_cfg(self) -> dict:
        """fewshot_config with lm-eval's inheritance from the task's own fields."""
        inherit = {"split": self.cfg.get("fewshot_split"), "process_docs": self.cfg.get("process_docs"),
                   "fewshot_delimiter": self.get("fewshot_delimiter", "\n\n"),
                   "target_delimiter": self.get("target_delimiter", " "), "gen_prefix": self.cfg.get("gen_prefix"),
                   "doc_to_text": self.cfg.get("doc_to_text"), "doc_to_choice": self.cfg.get("doc_to_choice"),
                   "doc_to_target": self.cfg.get("doc_to_target"), "sampler": "default"}
        return {**inherit, **(self.cfg.get("fewshot_config") or {})}

    def metrics(self) -> list[dict]:
        """metric_list entries (`metric` plus its keyword arguments), or the output type's defaults."""
        entries = self.cfg.get("metric_list") or [{"metric": m} for m in DEFAULT_METRICS[self.output_type]]
        return [dict(e) for e in entries]


AGGREGATIONS = ("mean", "median", "perplexity", "weighted_perplexity", "bits_per_byte", "f1", "matthews_corrcoef")


def make_task(cfg: dict, source: Path, data_dir: Path | None = None) -> Task:
    """A Task from its (already read) configuration: keys, output type, metrics and sampler checked, docs loaded."""
    name = str(cfg.get("task") or source.stem)
    unknown = sorted(set(cfg) - KEYS)
    if unknown:
        raise TaskError(f"task {name}: unsupported key(s) {', '.join(unknown)} ({source})")
    task = Task(name, source, cfg)
    if task.output_type not in OUTPUT_TYPES:
        raise TaskError(f"task {name}: output_type {task.output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
    for entry in task.metrics():
        metric = entry.get("metric")
        if isinstance(metric, str) and metric.startswith("!function"):
            raise TaskError(f"task {name}: metric {metric} was not imported")
        if not callable(metric) and metric not in SUPPORTED_METRICS[task.output_type]:
            raise TaskError(f"task {name}: metric {metric!r} is not supported for {task.output_type} "
                            f"(supported: {', '.join(sorted(SUPPORTED_METRICS[task.output_type]))}, or !function)")
        if entry.get("aggregation", "mean") not in AGGREGATIONS:
            raise TaskError(f"task {name}: aggregation {entry['aggregation']!r} is not supported "
                            f"({', '.join(AGGREGATIONS)})")
    repeats = task.get("repeats", 1)
    if not isinstance(repeats, int) or repeats < 1:
        raise TaskError(f"task {name}: repeats must be a positive integer, got {repeats!r}")
    if repeats > 1 and task.output_type != "generate_until":
        raise TaskError(f"task {name}: repeats > 1 only means something for generate_until (sampled answers)")
    fs = task.fewshot_cfg
    if fs.get("sampler", "default") not in ("default", "first_n"):
        raise TaskError(f"task {name}: fewshot sampler {fs['sampler']!r} is not supported (default, first_n)")
    _load_docs(task, data_dir)
    if task.docs and task.cfg.get("doc_to_choice") is not None:
        task.multiple_input = isinstance(doc_to_text(task, task.docs[0]), int)
    return task


def sampling(gen: dict) -> dict | None:
    """Sampling settings (temperature, top_p, top_k) of generation_kwargs, or None for greedy decoding.

    As transformers' generate under lm-eval's `hf`: do_sample decides; without it, a positive temperature samples."""
    temperature = float(gen.get("temperature", 0) or 0)
    do_sample = gen.get("do_sample")
    if do_sample is False or (do_sample is None and temperature <= 0):
        return None
    return {"temperature": temperature if temperature > 0 else 1.0, "top_p": float(gen.get("top_p", 1.0) or 1.0),
            "top_k": int(gen.get("top_k", 0) or 0)}


def unsafe_reason(task: Task) -> str | None:
    """Why running `task` executes model-written code outside lmforge's sandbox, or None when it does not.

    lm-eval marks such tasks `unsafe_code: true` (HumanEval with HF evaluate's code_eval runs the model's programs
    in-process); lmforge's own sandboxed metrics (`lmforge.eval.sandbox`, the built-in humaneval) are safe."""
    metrics = [e["metric"] for e in task.metrics() if callable(e["metric"])]
    foreign = [m for m in metrics if not getattr(m, "lmforge_sandboxed", False)]
    if task.cfg.get("unsafe_code") and (foreign or not metrics):
        what = ", ".join(getattr(m, "__name__", str(m)) for m in foreign) or "its process_results"
        return f"it is marked unsafe_code and its metric ({what}) runs model output outside lmforge's sandbox"
    for m in foreign:
        try:
            source = Path(inspect.getsourcefile(m) or "").read_text(encoding="utf-8")
        except (OSError, TypeError):
            continue
        if "code_eval" in source:
            return f"its metric {m.__name__} calls a code-execution metric (code_eval)"
    return None


def _local_split(name: str, split: str, data_dir: Path | None) -> Path | None:
    if data_dir is None:
        return None
    for ext in (".jsonl", ".json", ".parquet"):
        p = Path(data_dir) / name / f"{split}{ext}"
        if p.is_file():
            return p
    return None


def _load_docs(task: Task, data_dir: Path | None) -> None:
    """task.docs (the evaluation split, after process_docs) and the few-shot pool, as lm-eval picks them."""
    import datasets

    cfg = task.cfg
    splits = {s: cfg.get(f"{s}_split") for s in ("training", "validation", "test")}
    eval_split = splits["test"] or splits["validation"]
    if not eval_split:
        raise TaskError(f"task {task.name}: needs a test_split or validation_split")
    fs = task.fewshot_cfg
    wanted = [x for x in {*splits.values(), fs.get("split")} if x]
    local = {s: _local_split(task.name, s, data_dir) for s in wanted}
    try:
        if any(local.values()):
            if local.get(eval_split) is None:
                raise TaskError(f"task {task.name}: {data_dir}/{task.name}/ has no {eval_split}.jsonl (the split "
                                "it evaluates)")
            files = {s: str(p) for s, p in local.items() if p is not None}
            kind = "parquet" if all(p.endswith(".parquet") for p in files.values()) else "json"
            dataset = datasets.load_dataset(kind, data_files=files)
        else:
            kwargs = dict(cfg.get("dataset_kwargs") or {})
            path = cfg.get("dataset_path")
            if not path:
                raise TaskError(f"task {task.name}: no dataset_path")
            if "data_files" in kwargs:
                kwargs["data_files"] = _data_files(task, kwargs["data_files"])
            dataset = datasets.load_dataset(path, cfg.get("dataset_name"), **kwargs)
    except TaskError:
        raise
    except Exception as e:  # the hub offline, a missing file, a malformed JSON line: one line, with the task
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = f"; put the splits in {data_dir or 'DIR'}/{task.name}/<split>.jsonl and pass --data-dir" \
            if not any(local.values()) and cfg.get("dataset_path") not in ("json", "csv", "parquet", "text") else ""
        raise TaskError(f"task {task.name}: could not load its data ({type(e).__name__}: {first[:200]}){hint}") \
            from None

    def split_docs(split: str | None, process=None, required: bool = True):
        if not split or (split not in dataset and not required):
            return None
        if split not in dataset:
            raise TaskError(f"task {task.name}: the data has no split {split!r} (it has {', '.join(dataset)})")
        ds = dataset[split]
        process = process if process is not None else cfg.get("process_docs")
        return list(process(ds) if process is not None else ds)

    task.docs = split_docs(eval_split)
    # lm-eval's pool: the few-shot split (with fewshot_config's process_docs), else training, else validation docs,
    # else the evaluated ones; a missing pool only matters when examples are asked for (FewshotSampler)
    pool_split = fs.get("split") or splits["training"] or splits["validation"]
    task.fewshot_pool = split_docs(pool_split, fs.get("process_docs") if fs.get("split") else None,
                                   required=False) if pool_split else task.docs


def _data_files(task: Task, files):
    """data_files paths resolved as the datasets library does (the working directory), then beside the YAML."""
    def fix(p: str) -> str:
        if Path(p).exists() or "://" in p:
            return p
        beside = task.source.parent / p
        if beside.exists():
            return str(beside)
        raise TaskError(f"task {task.name}: data file {p} not found (relative paths are from the working "
                        f"directory, as in lm-eval, or beside {task.source.name})")

    if isinstance(files, str):
        return fix(files)
    if isinstance(files, list):
        return [fix(p) for p in files]
    return {k: fix(v) if isinstance(v, str) else [fix(p) for p in v] for k, v in files.items()}


# ---- document → text (lm-eval's doc_to_* semantics) --------------------------------------------
@functools.cache
def _jinja():
    """lm-eval's template environment (StrictUndefined, trailing newlines kept, regex_replace), sandboxed."""
    from jinja2 import BaseLoader, StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment(loader=BaseLoader(), undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = lambda s, pattern, repl, count=0: re.sub(pattern, repl, s, count=count)
    return env


def render(template: str, doc: dict) -> str:
    return _jinja().from_string(template).render(**doc)


def resolve_field(doc: dict, value):
    if value:
        return doc[value] if value in doc else render(value, doc)
    return value


def doc_to_text(task: Task, doc: dict, spec=None):
    spec = task.cfg.get("doc_to_text") if spec is None else spec
    if isinstance(spec, int) or callable(spec):
        return spec if isinstance(spec, int) else spec(doc)
    if isinstance(spec, str):
        if spec in doc:
            return doc[spec]
        text = render(spec, doc)
        return ast.literal_eval(text) if text.isdigit() and task.cfg.get("doc_to_choice") is not None else text
    raise TaskError(f"task {task.name}: doc_to_text must be a template, a field or a !function")


def doc_to_target(task: Task, doc: dict, spec=None):
    spec = task.cfg.get("doc_to_target") if spec is None else spec
    if isinstance(spec, (int, list)):
        return spec
    if callable(spec):
        return spec(doc)
    if isinstance(spec, str):
        if spec in doc:
            return doc[spec]
        text = render(spec, doc)
        if text.isdigit() and task.cfg.get("doc_to_choice") is not None:
            return ast.literal_eval(text)
        if len(text) >= 2 and text[0] == "[" and text[-1] == "]":
            try:
                return ast.literal_eval(text)
            except (SyntaxError, ValueError):
                return text
        return text
    raise TaskError(f"task {task.name}: doc_to_target must be a template, a field, an index, a list or a !function")


def doc_to_choice(task: Task, doc: dict, spec=None) -> list[str]:
    spec = task.cfg.get("doc_to_choice") if spec is None else spec
    if isinstance(spec, str):
        if spec in doc:
            return doc[spec]
        try:
            return ast.literal_eval(render(spec, doc))
        except (SyntaxError, ValueError):
            raise TaskError(f"task {task.name}: doc_to_choice {spec!r} does not render to a Python list") from None
    if isinstance(spec, list):
        return spec
    if isinstance(spec, dict):
        return list(spec.values())
    if callable(spec):
        return spec(doc)
    raise TaskError(f"task {task.name}: doc_to_choice must be a template, a field, a list or a !function")


def _maybe_delimit(prefix: str | None, suffix: str | None, delimiter: str = " ") -> str:
    if not prefix:
        return suffix or ""
    if not suffix:
        return prefix
    return prefix + suffix if prefix[-1].isspace() or suffix[0].isspace() else prefix + delimiter + suffix


@dataclass
class Message:
    """One turn of a prompt; `delim` follows it when the prompt is plain text (lm-eval's api.utils.Message)."""
    role: str
    content: str
    delim: str = ""


def _qa_turn(q, choices, answer, gen_prefix: str | None, tgt_delim: str, few_delim: str) -> list[Message]:
    """A question and (for a shot) its answer as user/assistant turns: lm-eval's build_qa_turn."""
    if not isinstance(q, str):
        raise TaskError(f"the prompt is not text: {q!r}")
    has_answer = answer is not None and answer != ""
    needs = bool(gen_prefix) and q != "" and not (q[-1].isspace() or gen_prefix[0].isspace())
    turns = [Message("user", q, tgt_delim if (has_answer and not gen_prefix) or needs else "")]
    if has_answer:
        a = choices[answer] if choices and isinstance(answer, int) else answer[0] if isinstance(answer, list) \
            else answer
        if not isinstance(a, str):
            raise TaskError(f"the answer of a few-shot example is not text: {a!r}")
        turns.append(Message("assistant", _maybe_delimit(gen_prefix, a, " "), few_delim))
    elif gen_prefix:
        turns.append(Message("assistant", gen_prefix))
    return turns


def _single_turn(messages: list[Message]) -> list[dict]:
    """Every turn after the system prompt folded into one user message (lm-eval's multiturn_to_singleturn);
    a trailing assistant turn (the gen_prefix) stays, for the model to continue."""
    system, rest = (messages[0], messages[1:]) if messages[0].role == "system" else (None, messages)
    tail = [rest[-1]] if rest[-1].role == "assistant" else []
    body = rest[:-1] if tail else rest
    text = "".join(m.content + m.delim for m in body[:-1]) + body[-1].content
    out = [{"role": "user", "content": text}] + [{"role": m.role, "content": m.content} for m in tail]
    return ([{"role": "system", "content": system.content}] if system else []) + out


def _render(messages: list[Message], chat: Callable | None, multiturn: bool, gen_prefix: str | None) -> str:
    """The prompt text: plain (each turn plus its delimiter) or through the model's chat template."""
    if chat is None:
        return "".join(m.content + m.delim for m in messages)
    turns = [{"role": m.role, "content": m.content} for m in messages] if multiturn else _single_turn(messages)
    return chat(turns, add_generation_prompt=not gen_prefix)


class FewshotSampler:
    """lm-eval's samplers: `default` draws with one Random(1234) in document order; `first_n` takes the first n."""

    def __init__(self, task: Task, seed: int = FEWSHOT_SEED):
        self.task, self.rnd = task, random.Random(seed)
        self.kind = task.fewshot_cfg.get("sampler", "default")
        self.pool = task.fewshot_pool or []
        # lm-eval passes the evaluated document (to drop it from the draw) when the few-shot split is the test split
        self.exclude_self = task.fewshot_cfg.get("split") == task.cfg.get("test_split")

    def sample(self, n: int, doc: dict) -> list[dict]:
        if n == 0:
            return []
        if not self.pool:
            raise TaskError(f"task {self.task.name}: no documents to draw {n} few-shot examples from")
        if self.kind == "first_n":
            pool = [x for x in self.pool if x != doc] if self.exclude_self else self.pool
            if n > len(pool):
                raise TaskError(f"task {self.task.name}: {n} few-shot examples requested, {len(pool)} available")
            return pool[:n]
        if n + self.exclude_self > len(self.pool):
            raise TaskError(f"task {self.task.name}: {n} few-shot examples requested, {len(self.pool)} available")
        if not self.exclude_self:
            return self.rnd.sample(self.pool, n)
        res = [x for x in self.rnd.sample(self.pool, n + 1) if x != doc][:n]
        if len(res) < n:
            res = self.rnd.sample([x for x in self.pool if x != doc], n)
        return res


def context(task: Task, doc: dict, shots: list[dict], system_instruction: str | None = None,
            chat: Callable | None = None, multiturn: bool = False):
    """The prompt for `doc` (one per choice for a multiple-input task): the system instruction and description,
    the few-shot examples with their answers, then the question; through `chat` (the model's chat template,
    called as chat(messages, add_generation_prompt=...)) when given, as lm-eval's fewshot_context builds it."""
    fs = task.fewshot_cfg
    description = resolve_field(doc, task.get("description", "")) or ""
    system = _maybe_delimit(system_instruction, description, task.get("fewshot_delimiter", "\n\n"))
    messages = [Message("system", system)] if system else []
    for shot in shots:
        choices = doc_to_choice(task, shot, fs.get("doc_to_choice")) if fs.get("doc_to_choice") else None
        q = doc_to_text(task, shot, fs.get("doc_to_text"))
        a = doc_to_target(task, shot, fs.get("doc_to_target"))
        if task.multiple_input:  # the shot's question is the context its gold index picks; the answer follows it
            q, choices = choices[q], None
        messages += _qa_turn(q, choices, a, resolve_field(shot, fs.get("gen_prefix")), fs["target_delimiter"],
                             fs["fewshot_delimiter"])
    gen_prefix = resolve_field(doc, task.cfg.get("gen_prefix"))
    if task.multiple_input:
        return [_render(messages + _qa_turn(c, None, None, gen_prefix, "", ""), chat, multiturn, gen_prefix)
                for c in doc_to_choice(task, doc)]
    messages += _qa_turn(doc_to_text(task, doc), None, None, gen_prefix, task.get("target_delimiter", " "), "")
    return _render(messages, chat, multiturn, gen_prefix)


def continuation_delimiter(task: Task, chat: bool) -> str:
    """What goes between a multiple-choice context and each choice: the target delimiter, except under a chat
    template, where the generation prompt already ends the context (unless a gen_prefix without trailing space)."""
    delim = task.get("target_delimiter", " ")
    if not chat:
        return delim
    prefix = task.cfg.get("gen_prefix")
    return delim if prefix and not prefix[-1].isspace() else ""


# ---- filters and metrics -----------------------------------------------------------------------
def _regex_filter(pattern: str = r"#### (\-?[0-9\.\,]+)", group_select: int = 0, fallback: str = "[invalid]"):
    rx = re.compile(pattern)

    def one(resp: str) -> str:
        match = rx.findall(resp if isinstance(resp, str) else "")
        if not match:
            return fallback
        match = match[group_select]
        if isinstance(match, tuple):
            match = next((m for m in match if m), fallback)
        return match.strip()

    return lambda resps, docs: [[one(r) for r in rs] for rs in resps]


def build_filter(task: Task, steps: list[dict]) -> Callable:
    """A filter pipeline from filter_list steps (regex, take_first, lowercase, uppercase, remove_whitespace,
    custom): responses (one list per document) in, filtered responses out."""
    fns = []
    for step in steps:
        step = dict(step)
        kind = step.pop("function", None)
        if kind == "regex":
            fns.append(_regex_filter(step.get("regex_pattern", r"#### (\-?[0-9\.\,]+)"),
                                     int(step.get("group_select", 0)), step.get("fallback", "[invalid]")))
        elif kind == "take_first":
            fns.append(lambda resps, docs: [r[0] for r in resps])
        elif kind == "lowercase":
            fns.append(lambda resps, docs: [[x.lower() for x in r] for r in resps])
        elif kind == "uppercase":
            fns.append(lambda resps, docs: [[x.upper() for x in r] for r in resps])
        elif kind == "remove_whitespace":
            fns.append(lambda resps, docs: [[x.strip() for x in r] for r in resps])
        elif kind == "custom" and callable(step.get("filter_fn")):
            fns.append(step["filter_fn"])
        else:
            raise TaskError(f"task {task.name}: filter function {kind!r} is not supported (regex, take_first, "
                            "lowercase, uppercase, remove_whitespace, custom with filter_fn: !function)")

    def run(resps, docs):
        for fn in fns:
            resps = list(fn(resps, docs))
        return resps

    return run


def metric_kwargs(entry: dict) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k not in ("metric", "aggregation", "higher_is_better")}
