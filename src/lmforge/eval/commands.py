"""`lmforge eval tasks|compare|perplexity|human`: benchmarks, perplexity, run comparison and human ratings."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from lmforge.command import CliError, Command, warn_if_on_command_line
from lmforge.config import Strict
from lmforge.infer.commands import DEVICE_HELP, DTYPE_HELP, Device, DType
from lmforge.model.commands import MODEL_HELP


class TasksConfig(Strict):
    model: str = Field(description=MODEL_HELP)
    tasks: list[str] = Field(description="built-in names (hellaswag, arc_easy, arc_challenge, mmlu (the group of 57 "
                                         "mmlu_<subject> tasks), truthfulqa_mc1, gsm8k, humaneval), task or group "
                                         "YAML paths, or names defined in --include-path, comma-separated; with "
                                         "bridge=lm-eval, any lm-eval task. A YAML's `!function f.g` runs Python "
                                         "from f.py beside the YAML: only use task files you trust")
    include_path: list[Path] = Field(default_factory=list, description="directories of task/group YAMLs whose names "
                                                                       "--tasks may use (lm-eval's --include_path)")
    limit: int | float | None = Field(None, description="first N documents per task (a fraction when below 1)")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples per prompt (None: the task's, else 0)")
    apply_chat_template: bool = Field(False, description="build each prompt as messages through the model's chat "
                                                         "template (lm-eval's --apply_chat_template)")
    fewshot_as_multiturn: bool | None = Field(None, description="with apply_chat_template: few-shot examples as "
                                                                "user/assistant turns (None: on with the template, "
                                                                "as lm-eval); --no-fewshot-as-multiturn folds them into "
                                                                "one user turn")
    system_instruction: str | None = Field(None, description="text put before the task description (the system "
                                                             "turn under a chat template)")
    log_samples: bool = Field(False, description="also write each document's prompt, responses, filtered answer, "
                                                 "target and metrics to samples_<task>_<out stem>.jsonl beside --out "
                                                 "(lm-eval's --log_samples)")
    bootstrap_iters: int = Field(100_000, ge=0, description="resamples for the stderr of median, perplexity, f1 and "
                                                            "mcc (lm-eval's; 0: no stderr for those)")
    seed: int = Field(1234, description="seed of sampled generations (tasks with do_sample/temperature, repeats)")
    confirm_run_unsafe_code: bool = Field(False, description="run tasks that execute model-written code outside "
                                                             "lmforge's sandbox (lm-eval's unsafe_code tasks)")
    data_dir: Path | None = Field(None, description="local data: DIR/<task>/<split>.jsonl replaces the task's hub "
                                                    "dataset")
    max_length: int | None = Field(None, ge=1, description="context window in tokens (None: the model's positions)")
    batch_tokens: int | None = Field(None, ge=1, description="tokens per scoring forward pass (None: 2,048 on CPU, "
                                                             "16,384 on GPU)")
    device: Device = Field("auto", description=DEVICE_HELP)
    dtype: DType = Field("auto", description=DTYPE_HELP)
    bridge: Literal["lm-eval"] | None = Field(None, description="run the tasks with lm-eval-harness itself, on the "
                                                                "model lmforge loaded (needs the `eval` extra)")
    out: Path | None = Field(None, description="write the results (with this config) to this JSON file")

    @model_validator(mode="after")
    def _consistent(self):
        if self.log_samples and self.out is None:
            raise ValueError("--log-samples writes beside the results: give --out FILE.json too")
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise ValueError("--fewshot-as-multiturn needs --apply-chat-template")
        return self

    @model_validator(mode="before")
    @classmethod
    def _not_a_task_file(cls, data):
        """An lm-eval task YAML given where the command's config goes: say where it belongs."""
        if isinstance(data, dict) and ("task" in data or "dataset_path" in data or "group" in data) \
                and "tasks" not in data:
            raise ValueError("this YAML defines an lm-eval task or group, not an `eval tasks` config: give it as "
                             "tasks=FILE (or --tasks FILE)")
        return data

    @field_validator("tasks", mode="before")
    @classmethod
    def _split(cls, v):
        """`a,b` and [a, b] alike; flags may repeat (--tasks a --tasks b)."""
        items = [v] if isinstance(v, str) else v
        if isinstance(items, list) and all(isinstance(t, str) for t in items):
            items = [t.strip() for item in items for t in item.split(",") if t.strip()]
            if not items:
                raise ValueError("give at least one task name or task YAML")
        return items


class PreferenceConfig(Strict):
    model: str = Field(description="a reward model (align algorithm=reward run, HF sequence classifier, SEQ_CLS "
                                   "adapter) or a policy (scored with --reference)")
    data: str = Field(description="preference pairs: prompt/chosen/rejected, or HH-RLHF chosen/rejected dialogues")
    reference: str | None = Field(None, description="the policy's reference model (DPO's implicit reward)")
    beta: float = Field(0.1, gt=0, description="implicit reward scale (the DPO run's dpo.beta)")
    template: Literal["auto", "chat", "none"] = Field("auto", description="as align's data.template")
    max_length: int = Field(1024, gt=1, description="prompt + answer tokens; longer pairs are truncated (counted)")
    limit: int | None = Field(None, gt=0, description="first N records")
    batch_size: int = Field(4, ge=1, description="pairs per forward pass")
    device: Device = Field("auto", description=DEVICE_HELP)
    dtype: DType = Field("auto", description=DTYPE_HELP)
    out: Path | None = Field(None, description="write the result (with this config) to this JSON file")


class CompareConfig(Strict):
    run_a: str = Field(description="results JSON of `eval tasks` or lm-eval (or a directory holding one)")
    run_b: str = Field(description="results JSON of `eval tasks` or lm-eval (or a directory holding one)")


class PerplexityConfig(Strict):
    model: str = Field(description=MODEL_HELP)
    data: Path = Field(description=".txt (one document), .jsonl (`text` per line) or .json list")
    max_length: int | None = Field(None, ge=1, description="tokens per window (None: the model's positions)")
    stride: int | None = Field(None, description="tokens each window predicts (None: max_length, as lm-eval)")
    batch_size: int | None = Field(None, ge=1, description="windows per forward pass (None: 2,048 tokens' worth on CPU, "
                                                     "16,384 on GPU)")
    device: Device = Field("auto", description=DEVICE_HELP)
    dtype: DType = Field("auto", description=DTYPE_HELP)
    out: Path | None = Field(None, description="write the numbers (with this config) to this JSON file")


class HumanConfig(Strict):
    models: list[str] = Field(description="two or more model specs (alias, .gguf, HF directory, run, adapter)")
    prompts: Path = Field(description=".jsonl (`prompt`, or `instruction` + `input`, per line), .json list (e.g. "
                                      "Alpaca's) or .txt (one prompt per line)")
    out: Path = Field(Path("eval-human"), description="directory for answers.jsonl, votes.sqlite and config.yaml")
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="port")
    max_new_tokens: int = Field(256, ge=1, description="longest answer in tokens")
    temperature: float = Field(0.0, ge=0, description="sampling temperature (0: greedy)")
    template: Literal["chat", "alpaca", "none"] = Field(
        "chat", description="prompt format: chat = one user turn in the model's chat template; alpaca = ### "
                            "Instruction / ### Response; none = the prompt as plain text")
    seed: int = Field(0, description="seeds sampling (with temperature) and which pairs are shown")
    device: Device = Field("auto", description="where the answers are generated: " + DEVICE_HELP)
    dtype: DType = Field("auto", description=DTYPE_HELP)
    token_ttl_s: float = Field(3600.0, gt=0, description="seconds a page stays votable; a vote after that is refused "
                                                          "(reload the page)")
    votes_per_minute: int = Field(30, ge=1, description="votes and ratings one voter (browser cookie) may send a "
                                                        "minute; more get 429")
    address_votes_per_minute: int = Field(120, ge=0, description="votes and ratings a minute from one client address, "
                                                                 "whatever its cookies (0: no limit; behind a proxy "
                                                                 "every client has the proxy's address)")
    password: str | None = Field(None, repr=False, description="require this password (HTTP Basic auth, any user "
                                                               "name) on every page but /health; "
                                                               "LMFORGE_HUMAN_PASSWORD sets it too and keeps it out "
                                                               "of `ps`")

    @field_validator("password", mode="before")
    @classmethod
    def _password_text(cls, v):
        """A number in YAML (`password: 1234`) is the password's text: pydantic's error would quote it."""
        return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def run_tasks(cfg: TasksConfig) -> int:
    from lmforge.eval import harness
    from lmforge.eval.lm import EvalModel

    if cfg.data_dir and not cfg.data_dir.is_dir():
        raise CliError(f"--data-dir {cfg.data_dir}: no such directory")
    _prepare_out(cfg.out)
    multiturn = cfg.apply_chat_template if cfg.fewshot_as_multiturn is None else cfg.fewshot_as_multiturn
    t0 = time.perf_counter()
    if cfg.bridge == "lm-eval":  # task definitions fail here, before the model loads
        from lmforge.eval.bridge import evaluate_with_lm_eval, lm_eval_tasks

        names, manager = lm_eval_tasks(cfg.tasks, cfg.include_path)
        items = []
    else:
        from lmforge.eval.groups import load

        items = load(cfg.tasks, cfg.data_dir, cfg.include_path)  # every task's definition and data, before the model
        refused = harness.unsafe(items)
        if refused and not cfg.confirm_run_unsafe_code:
            raise CliError(f"task {refused[0]}; pass --confirm-run-unsafe-code to run it anyway (lmforge's "
                           "sandboxed humaneval needs no flag)")
    model = EvalModel.load(cfg.model, device=cfg.device, max_length=cfg.max_length, batch_tokens=cfg.batch_tokens,
                           dtype=cfg.dtype)
    samples: dict | None = {} if cfg.log_samples else None
    try:
        if cfg.bridge == "lm-eval":
            results = evaluate_with_lm_eval(model, names, manager, limit=cfg.limit, num_fewshot=cfg.num_fewshot,
                                            system_instruction=cfg.system_instruction,
                                            apply_chat_template=cfg.apply_chat_template, multiturn=multiturn,
                                            bootstrap_iters=cfg.bootstrap_iters,
                                            confirm_run_unsafe_code=cfg.confirm_run_unsafe_code, samples=samples)
        else:
            settings = harness.Settings(cfg.system_instruction, model.chat if cfg.apply_chat_template else None,
                                        multiturn, cfg.bootstrap_iters, cfg.seed)
            results = harness.evaluate(model, items, limit=cfg.limit, num_fewshot=cfg.num_fewshot, settings=settings,
                                       samples=samples)
    finally:
        model.close()
    seconds = time.perf_counter() - t0
    print(harness.table(results))
    tree = harness.group_tree(items)
    print(f"{cfg.model}: {len(results) - len(tree)} task(s){f', {len(tree)} group(s)' if tree else ''} in "
          f"{seconds:.1f} s")
    if cfg.out:
        _write_json(cfg.out, {"model": cfg.model, "dtype": _dtype_name(model.dtype), "results": results,
                              "groups": tree, "config": cfg.model_dump(mode="json"),
                              "seconds": round(seconds, 2)})
        for task, records in (samples or {}).items():
            path = cfg.out.parent / f"samples_{task}_{cfg.out.stem}.jsonl"
            path.write_text("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records))
            print(f"wrote {path} ({len(records)} records)")
    return 0


def run_compare(cfg: CompareConfig) -> int:
    from lmforge.eval import harness

    rows = harness.compare(harness.read_results(cfg.run_a), harness.read_results(cfg.run_b))
    if not rows:
        raise CliError(f"{cfg.run_a} and {cfg.run_b} share no task metric to compare")
    print(harness.compare_table(rows, cfg.run_a, cfg.run_b))
    return 0


def run_perplexity(cfg: PerplexityConfig) -> int:
    from dataclasses import asdict

    from lmforge.eval.lm import EvalModel
    from lmforge.eval.perplexity import read_documents, score

    docs = read_documents(cfg.data)
    _prepare_out(cfg.out)
    model = EvalModel.load(cfg.model, device=cfg.device, max_length=cfg.max_length, dtype=cfg.dtype)
    if cfg.batch_size:
        model.batch_tokens = cfg.batch_size * model.max_length
    r = score(model, docs, cfg.stride)
    print(f"{r.documents} documents, {r.tokens:,} tokens, {r.words:,} words, {r.bytes:,} bytes "
          f"(max length {model.max_length}, stride {cfg.stride or model.max_length})")
    for key in ("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"):
        print(f"{key:<18} {getattr(r, key):.4f}")
    if cfg.out:
        _write_json(cfg.out, {"model": cfg.model, "data": str(cfg.data), "dtype": _dtype_name(model.dtype),
                              "max_length": model.max_length, "stride": cfg.stride or model.max_length, **asdict(r),
                              "config": cfg.model_dump(mode="json")})
    return 0


def run_preference(cfg: PreferenceConfig) -> int:
    from lmforge.eval.preference import score_preferences

    _prepare_out(cfg.out)
    try:
        r = score_preferences(cfg.model, cfg.data, cfg.reference, beta=cfg.beta, max_length=cfg.max_length,
                              max_examples=cfg.limit, batch_size=cfg.batch_size, template=cfg.template,
                              device=cfg.device, dtype=cfg.dtype)
    except ValueError as e:
        raise CliError(str(e)) from None
    rep = r["data_report"]
    print(f"{r['model']} on {r['data']} ({r['scored_by']}): accuracy {r['accuracy']:.4f}, margin {r['margin']:.4f}, "
          f"n {r['n']} (skipped: {sum(rep['skipped'].values())}, truncated: {rep['truncated']})")
    if cfg.out:
        _write_json(cfg.out, {**r, "config": cfg.model_dump(mode="json")})
    return 0


def run_human(cfg: HumanConfig) -> int:
    import os

    from lmforge.config import dump_config
    from lmforge.eval.human.answers import Settings, ensure_answers, read_prompts
    from lmforge.eval.human.app import PASSWORD_ENV, Session, serve
    from lmforge.eval.human.store import Store
    from lmforge.model.load import resolve

    if cfg.password == "" or (cfg.password is None and os.environ.get(PASSWORD_ENV) == ""):
        raise CliError(f"the password is empty: give one, or unset --password and {PASSWORD_ENV} for open pages")
    password = cfg.password if cfg.password is not None else os.environ.get(PASSWORD_ENV)
    warn_if_on_command_line([password], "the password", PASSWORD_ENV)
    if len(cfg.models) < 2:
        raise CliError(f"--models needs at least 2 models to compare, got {len(cfg.models)}")
    if len(set(cfg.models)) < len(cfg.models):
        raise CliError("--models names the same model twice")
    prompts = read_prompts(cfg.prompts)
    for m in cfg.models:
        resolve(m)  # a missing path or unknown alias fails here, before any model is loaded
    out = cfg.out
    settings = Settings(cfg.max_new_tokens, cfg.temperature, cfg.seed, cfg.template)
    answers, generated, reused = ensure_answers(cfg.models, prompts, settings, out / "answers.jsonl", cfg.device,
                                                cfg.dtype)
    dump_config(cfg.model_copy(update={"password": None}), out / "config.yaml")  # never the password
    print(f"answers: {generated} generated, {reused} reused ({len(prompts)} prompts x {len(cfg.models)} models) "
          f"in {out / 'answers.jsonl'}")
    store = Store(out / "votes.sqlite", cfg.models, token_ttl_s=cfg.token_ttl_s)
    print(f"votes: {out / 'votes.sqlite'}")
    locked = "; password required (HTTP Basic auth)" if password else ""
    print(f"serving http://{cfg.host}:{cfg.port}/ (pairwise votes), /rate (1-5 ratings), /results (leaderboard, "
          f"CSV){locked}; Ctrl-C stops", flush=True)
    serve(Session(store, cfg.models, prompts, answers, seed=cfg.seed, votes_per_minute=cfg.votes_per_minute,
                  address_votes_per_minute=cfg.address_votes_per_minute, password=password), cfg.host, cfg.port)
    return 0


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _prepare_out(path: Path | None) -> None:
    """Create the results file's directory before any work, so a bad path fails first and no result is lost."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
    print(f"wrote {path}")


COMMANDS = [
    Command("eval tasks", "benchmark tasks in lm-eval's YAML format (multiple choice, generate-until, code)",
            lambda: TasksConfig, run_tasks, positionals=("model",),
            description="Run lm-eval-format tasks (built-in names or task YAML files) on MODEL and print acc / "
                        "acc_norm / exact_match / pass@1 with standard errors; out=F.json writes them with the "
                        "resolved config and dtype."),
    Command("eval compare", "per-metric deltas between two task runs, with their standard errors",
            lambda: CompareConfig, run_compare, positionals=("run_a", "run_b"),
            description="Compare two `eval tasks --out` files (or lm-eval results JSONs): B - A, the standard error "
                        "of the difference and z."),
    Command("eval perplexity", "rolling-window perplexity as lm-eval's loglikelihood_rolling scores it",
            lambda: PerplexityConfig, run_perplexity, positionals=("model",),
            description="Token, word and byte perplexity and bits per byte of MODEL on documents (lm-eval's "
                        "definitions and windows)."),
    Command("eval preference", "share of preference pairs a reward model (or a policy vs its reference) gets right",
            lambda: PreferenceConfig, run_preference, positionals=("model",),
            description="Score chosen against rejected answers: a reward model directly, a policy by DPO's implicit "
                        "reward beta * (log pi - log pi_ref) against --reference. Prints accuracy, mean margin and "
                        "n; out=F.json writes them with the data report."),
    Command("eval human", "web page for pairwise votes and 1-5 ratings; Elo and Bradley-Terry leaderboard",
            lambda: HumanConfig, run_human, multi=("models",),
            description="Generate each model's answer to every prompt once (cached in OUT/answers.jsonl), then serve "
                        "a web page: / shows two anonymous answers to vote on, /rate one answer to rate 1-5, /results "
                        "the leaderboard (online Elo, Bradley-Terry with bootstrap 95% intervals) and its CSV. Votes "
                        "go to OUT/votes.sqlite, the resolved config to OUT/config.yaml."),
]
