"""`eval tasks` against lm-eval itself: groups (5-shot MMLU per subject), chat templates, multiple-input tasks,
--log-samples records, sampled pass@k and the bootstrap standard errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import OFFLINE, ROOT, require, run_cli, save_tiny
from lmforge.eval import groups as G
from lmforge.eval import harness
from lmforge.eval import metrics as M
from lmforge.eval import tasks as T

DATA = ROOT / "tests" / "data" / "eval"
LMEVAL = ROOT / "tests" / "data" / "lmeval"
WINO = LMEVAL / "winogrande" / "wino_local.yaml"
SUBJECTS = ("anatomy", "astronomy", "high_school_biology")
SYSTEM = "You are a careful student. Answer with one letter."

pytestmark = pytest.mark.usefixtures("hub_offline")


@pytest.fixture(scope="module")
def chat_tiny(tmp_path_factory):
    """The tiny Llama with a ChatML template, so --apply-chat-template has one to apply."""
    from transformers import AutoTokenizer

    from lmforge.tokens.chat import CHATML_TEMPLATE

    path = save_tiny(tmp_path_factory.mktemp("chat-tiny") / "model", seed=4, max_positions=2048)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(path)
    return path


def mmlu_local(d: Path) -> Path:
    """Three built-in MMLU subjects over tests/data/eval's rows, as YAMLs lm-eval reads too, in a nested group:
    mmlu_local = [mmlu_local_stem (a group over a tag: anatomy, astronomy), local_mmlu_high_school_biology]."""
    d.mkdir(parents=True, exist_ok=True)
    for s in SUBJECTS:
        files = {split: str(DATA / f"mmlu_{s}" / f"{split}.jsonl") for split in ("dev", "test")}
        cfg = {"include": str(T.BUILTIN_DIR / "mmlu" / f"mmlu_{s}.yaml"), "task": f"local_mmlu_{s}",
               "dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": files},
               "tag": "mmlu_local_stem_tasks" if s != "high_school_biology" else "mmlu_local_other_tasks"}
        (d / f"local_mmlu_{s}.yaml").write_text(json.dumps(cfg))
    agg = {"aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}]}
    (d / "mmlu_local_stem.yaml").write_text(json.dumps({"group": "mmlu_local_stem",
                                                        "task": ["mmlu_local_stem_tasks"], **agg}))
    group = d / "mmlu_local.yaml"
    group.write_text(json.dumps({"group": "mmlu_local", "task": ["mmlu_local_stem", "local_mmlu_high_school_biology"],
                                 **agg}))
    return group


def lm_eval_hf(model: Path, out: Path, include: Path, tasks: str, *extra: str) -> tuple[dict, dict[str, list]]:
    """`lm_eval --model hf` with --log_samples: (results, {task: sample records})."""
    require("lm_eval")
    env = {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(out / "hf"), "DISABLE_MULTIPROC": "1"}
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={model},dtype=float32", "--device", "cpu", "--batch_size", "8",
                           "--include_path", str(include), "--tasks", tasks, "--log_samples",
                           "--output_path", str(out / "lm-eval"), *extra], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [res] = (out / "lm-eval").rglob("results_*.json")
    samples = {}
    for f in (out / "lm-eval").rglob("samples_*.jsonl"):
        task = f.name.removeprefix("samples_").rsplit("_", 1)[0]
        samples[task] = [json.loads(line) for line in f.read_text().splitlines()]
    return json.loads(res.read_text())["results"], samples


@pytest.mark.slow
@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat-template"])
def test_5shot_mmlu_group_and_winogrande_equal_lm_eval_hf(tmp_path, chat_tiny, chat):
    """Per-subject and group accuracies (and stderrs), Winogrande's multiple-input accuracy, every prompt and the
    --log-samples records equal `lm_eval --model hf` run with the same options."""
    group = mmlu_local(tmp_path / "tasks")
    wino = group.parent / WINO.name
    for f in (WINO, WINO.parent / "preprocess.py"):
        (group.parent / f.name).write_text(f.read_text())
    options = ["--apply_chat_template", "--system_instruction", SYSTEM] if chat else []
    want, want_samples = lm_eval_hf(chat_tiny, tmp_path, group.parent, "mmlu_local,wino_local", "--num_fewshot", "5",
                                    *options)
    ours = tmp_path / "ours" / "r.json"
    flags = ["--apply-chat-template", "--system-instruction", SYSTEM] if chat else []
    p = run_cli("eval", "tasks", str(chat_tiny), "--tasks", f"{group},{wino}", "--num-fewshot", "5", "--device",
                "cpu", "--log-samples", "--out", str(ours), *flags, env=OFFLINE)
    assert "mmlu_local_stem" in p.stdout
    got = json.loads(ours.read_text())
    assert got["groups"] == {"mmlu_local": ["mmlu_local_stem", "local_mmlu_high_school_biology"],
                             "mmlu_local_stem": ["local_mmlu_anatomy", "local_mmlu_astronomy"]}
    results = got["results"]
    for name in [f"local_mmlu_{s}" for s in SUBJECTS] + ["mmlu_local_stem", "mmlu_local", "wino_local"]:
        for metric in ("acc", "acc_norm") if name == "wino_local" else ("acc",):
            assert results[name][metric] == pytest.approx(want[name][f"{metric},none"], abs=1e-12), (name, metric)
            assert results[name][f"{metric}_stderr"] == pytest.approx(want[name][f"{metric}_stderr,none"],
                                                                      rel=1e-9), (name, metric)
    assert results["mmlu_local"]["n_samples"] == 18
    assert set(want_samples) == {f"local_mmlu_{s}" for s in SUBJECTS} | {"wino_local"}
    for task, theirs in want_samples.items():
        mine = [json.loads(line) for line in (ours.parent / f"samples_{task}_r.jsonl").read_text().splitlines()]
        assert len(mine) == len(theirs) == (10 if task == "wino_local" else 6)
        for a, b in zip(sorted(mine, key=lambda r: r["doc_id"]), sorted(theirs, key=lambda r: r["doc_id"])):
            assert set(b) <= set(a), set(b) - set(a)
            for key in ("doc_id", "doc", "target", "arguments", "filter", "metrics", "doc_hash", "prompt_hash",
                        "target_hash", "acc"):
                assert a[key] == b[key], (task, key)
            lls = [float(r[0]) for r in a["filtered_resps"]]
            assert lls == pytest.approx([float(r[0]) for r in b["filtered_resps"]], abs=1e-4)
            if chat:
                assert a["arguments"]["gen_args_0"]["arg_0"].startswith(f"<|im_start|>system\n{SYSTEM}")


@pytest.fixture(scope="module")
def prompt_tasks(tmp_path_factory):
    """One directory with local 5-shot MMLU subjects, Winogrande and GSM8K task YAMLs, and lm-eval's TaskManager
    over it (indexing lm-eval's own tasks takes seconds: once per module)."""
    require("lm_eval")
    from lm_eval.tasks import TaskManager

    d = tmp_path_factory.mktemp("prompt-tasks")
    mmlu_local(d)
    for f in (WINO, WINO.parent / "preprocess.py"):
        (d / f.name).write_text(f.read_text())
    rows = [{"question": f"Tom has {i} apples and buys {i + 2} more. How many?", "answer": f"#### {2 * i + 2}"}
            for i in range(12)]
    for split, part in (("train", rows[:8]), ("test", rows[8:])):
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    (d / "gsm8k_local.yaml").write_text(json.dumps({
        "include": str(T.BUILTIN_DIR / "gsm8k.yaml"), "task": "gsm8k_local", "dataset_path": "json",
        "dataset_name": None, "dataset_kwargs": {"data_files": {"train": str(d / "train.jsonl"),
                                                                "test": str(d / "test.jsonl")}}}))
    return d, TaskManager(include_path=str(d))


@pytest.mark.slow
def test_bridge_passes_the_template_options_and_logs_lm_evals_samples(tmp_path, chat_tiny):
    """--bridge lm-eval with --apply-chat-template, --system-instruction and --log-samples: lm-eval builds the same
    prompts as the native run, through the model's template (EvalModel.chat), and the sample files match."""
    group = mmlu_local(tmp_path / "tasks")
    flags = ["--apply-chat-template", "--system-instruction", SYSTEM, "--num-fewshot", "2", "--limit", "3",
             "--log-samples", "--device", "cpu"]
    task = str(group.parent / "local_mmlu_anatomy.yaml")
    run_cli("eval", "tasks", str(chat_tiny), "--tasks", task, *flags, "--out", str(tmp_path / "native.json"),
            env=OFFLINE)
    run_cli("eval", "tasks", str(chat_tiny), "--tasks", task, *flags, "--bridge", "lm-eval",
            "--out", str(tmp_path / "bridge.json"), env=OFFLINE)
    native, bridged = ([json.loads(line) for line in (tmp_path / f"samples_local_mmlu_anatomy_{n}.jsonl")
                        .read_text().splitlines()] for n in ("native", "bridge"))
    assert len(native) == len(bridged) == 3
    for a, b in zip(native, sorted(bridged, key=lambda r: r["doc_id"])):
        assert a["arguments"] == b["arguments"] and a["prompt_hash"] == b["prompt_hash"]
        assert a["arguments"]["gen_args_0"]["arg_0"].startswith(f"<|im_start|>system\n{SYSTEM}")
    a, b = (json.loads((tmp_path / f"{n}.json").read_text())["results"]["local_mmlu_anatomy"]
            for n in ("native", "bridge"))
    assert a["acc"] == b["acc"]


def lm_eval_prompts(manager, name: str, shots: int, **options) -> list:
    """lm-eval's requests for a task: (context, continuation) per choice, or the generation context."""
    theirs = next(iter(manager.load([name])["tasks"].values()))
    theirs.set_fewshot_seed(seed=T.FEWSHOT_SEED)
    theirs.set_config(key="num_fewshot", value=shots)
    theirs.build_all_requests(limit=len(theirs.eval_docs), rank=0, world_size=1, **options)
    return [i.args if i.request_type == "loglikelihood" else i.args[0] for i in theirs.instances]


def our_prompts(task: T.Task, shots: int, settings: harness.Settings) -> list:
    sampler = T.FewshotSampler(task)
    out = []
    for doc in task.docs:
        ctx = T.context(task, doc, sampler.sample(shots, doc), settings.system_instruction, settings.chat,
                        settings.multiturn)
        if task.output_type != "multiple_choice":
            out.append(ctx)
            continue
        delim = T.continuation_delimiter(task, settings.chat is not None)
        out += [(c, delim + T.doc_to_target(task, doc)) for c in ctx] if task.multiple_input else \
            [(ctx, delim + c) for c in T.doc_to_choice(task, doc)]
    return out


@pytest.mark.parametrize("chat,multiturn,system", [(False, False, None), (False, False, SYSTEM),
                                                   (True, True, None), (True, False, SYSTEM), (True, True, SYSTEM)])
@pytest.mark.parametrize("name", ["local_mmlu_anatomy", "wino_local", "gsm8k_local"])
def test_prompts_equal_lm_evals_under_every_template_option(prompt_tasks, chat_tiny, chat, multiturn, system, name):
    """--apply-chat-template, --fewshot-as-multiturn and --system-instruction build lm-eval's prompts: 5-shot
    MMLU (description in the system turn), Winogrande (one context per choice) and GSM8K (generation)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_tiny)

    def template(messages, add_generation_prompt=True):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                       continue_final_message=not add_generation_prompt)

    d, manager = prompt_tasks
    cwd = os.getcwd()
    os.chdir(ROOT)  # the Winogrande YAML's data paths are relative to the repository root, as for lm-eval
    try:
        ours = G.load([str(d / f"{name}.yaml")])[0]
        want = lm_eval_prompts(manager, name, 5, system_instruction=system, apply_chat_template=chat,
                               fewshot_as_multiturn=multiturn, chat_template=template if chat else None)
    finally:
        os.chdir(cwd)
    got = our_prompts(ours, 5, harness.Settings(system, template if chat else None, multiturn))
    assert got == want


class Sampler:
    """A stand-in model whose sampled completions are scripted: document i's j-th sample from `table`."""

    def __init__(self, table: dict[int, list[str]]):
        self.table, self.calls = table, []

    def generate_until(self, contexts, until, max_gen_toks, sampling=None, n=1, seed=1234):
        self.calls.append((len(contexts), n, sampling))
        return [s for i in range(len(contexts)) for s in self.table[i][:n]]

    def close(self):
        pass


RIGHT = {0: "    return a + b\n", 1: "    return n % 2 == 0\n", 2: "    return max(xs)\n", 3: "    return s[::-1]\n"}
WRONG = "    return None\n"


def sampled_humaneval(tmp_path: Path, metric: str, unsafe: bool) -> Path:
    """The built-in HumanEval over the local toy problems with 4 sampled answers each, scored by `metric` (a
    `!function` beside the written YAML)."""
    path = tmp_path / "he4" / "he4.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""include: {T.BUILTIN_DIR / 'humaneval.yaml'}
task: he4
dataset_path: json
dataset_kwargs:
  data_files:
    test: {DATA / 'humaneval' / 'test.jsonl'}
unsafe_code: {str(unsafe).lower()}
repeats: 4
generation_kwargs:
  until: ["\\nclass", "\\ndef", "\\n#", "\\nif", "\\nprint"]
  max_gen_toks: 64
  do_sample: true
  temperature: 0.8
  top_p: 0.95
metric_list:
  - metric: !function {metric}
    aggregation: mean
    higher_is_better: true
    k: [1, 2, 4]
""")
    return path


def test_sampled_pass_at_k_equals_lm_eval_on_the_same_samples(tmp_path):
    """pass@1/2/4 from 4 samples per problem (0 to 4 of them right): lmforge's sandboxed scoring and lm-eval's
    evaluator running HF code_eval's estimator on the same samples (replayed through an lm-eval LM) agree."""
    require("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    (tmp_path / "he4").mkdir()
    (tmp_path / "he4" / "lmforge_utils.py").write_text((T.BUILTIN_DIR / "utils.py").read_text())
    task = G.load([str(sampled_humaneval(tmp_path, "lmforge_utils.pass_at_k", False))])[0]
    table = {i: [RIGHT[i]] * i + [WRONG] * (4 - i) for i in range(4)}  # problem i: i of 4 samples right
    model = Sampler(table)
    records: list = []
    ours = harness.run_task(model, task, samples=records)
    assert model.calls == [(4, 4, {"temperature": 0.8, "top_p": 0.95, "top_k": 0})]
    assert [len(r["resps"][0]) for r in records] == [4, 4, 4, 4]

    # lm-eval's side: the same YAML scored by an independent pass@k (HF code_eval's estimator, programs run in a
    # subprocess), the same completions replayed in request order
    (tmp_path / "he4" / "code_eval_utils.py").write_text((LMEVAL / "code_eval_utils.py").read_text())
    theirs_yaml = sampled_humaneval(tmp_path, "code_eval_utils.pass_at_k", True)
    by_prompt = {r["doc"]["prompt"]: list(r["resps"][0]) for r in records}

    class Replay(LM):
        def loglikelihood(self, requests):
            raise AssertionError("generation only")

        loglikelihood_rolling = loglikelihood

        def generate_until(self, requests):
            return [by_prompt[req.args[0]].pop(0) for req in requests]

    res = simple_evaluate(model=Replay(), tasks=["he4"], task_manager=TaskManager(include_path=str(theirs_yaml.parent)),
                          confirm_run_unsafe_code=True, bootstrap_iters=0)
    want = res["results"]["he4"]
    for k in (1, 2, 4):
        assert ours[f"pass@{k},create_test"] == pytest.approx(want[f"pass@{k},create_test"], abs=1e-12), k
    # problem i has i of 4 right: pass@1 = mean(i / 4) = 0.375; pass@4 = 3 / 4
    assert ours["pass@1,create_test"] == pytest.approx(0.375) and ours["pass@4,create_test"] == pytest.approx(0.75)


def test_a_task_running_code_outside_the_sandbox_is_refused_without_the_flag(tmp_path, chat_tiny):
    """unsafe_code with a metric that is not lmforge's sandbox: one-line refusal (exit 2) unless
    --confirm-run-unsafe-code; a metric calling code_eval is refused even unmarked; the built-in humaneval runs."""
    (tmp_path / "he4").mkdir()
    (tmp_path / "he4" / "code_eval_utils.py").write_text((LMEVAL / "code_eval_utils.py").read_text())
    unsafe = sampled_humaneval(tmp_path, "code_eval_utils.pass_at_k", True)
    unsafe.write_text(unsafe.read_text().replace("repeats: 4", "repeats: 1").replace("k: [1, 2, 4]", "k: [1]"))
    args = ["eval", "tasks", str(chat_tiny), "--tasks", str(unsafe), "--device", "cpu", "--limit", "1"]
    p = run_cli(*args, check=False)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "he4: it is marked unsafe_code" in p.stderr and "--confirm-run-unsafe-code" in p.stderr
    unmarked = tmp_path / "he4" / "unmarked.yaml"
    unmarked.write_text(unsafe.read_text().replace("unsafe_code: true", "unsafe_code: false"))
    p = run_cli(*args[:4], str(unmarked), *args[5:], check=False)
    assert p.returncode == 2 and "calls a code-execution metric (code_eval)" in p.stderr, p.stderr
    p = run_cli(*args, "--confirm-run-unsafe-code")
    assert "pass@1" in p.stdout
    run_cli("eval", "tasks", str(chat_tiny), "--tasks", "humaneval", "--data-dir", str(DATA), "--limit", "1",
            "--device", "cpu")
    assert "!function" in run_cli("eval", "tasks", "--help").stdout


def test_sampled_generation_repeats_and_seeds(tmp_path, chat_tiny):
    """repeats with do_sample: n different samples per document in --log-samples, the same again with the same
    --seed, different with another."""
    (tmp_path / "he4").mkdir()
    (tmp_path / "he4" / "lmforge_utils.py").write_text((T.BUILTIN_DIR / "utils.py").read_text())
    path = sampled_humaneval(tmp_path, "lmforge_utils.pass_at_k", False)
    runs = {}
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        out = tmp_path / f"{name}.json"
        run_cli("eval", "tasks", str(chat_tiny), "--tasks", str(path), "--limit", "2", "--device", "cpu", "--seed",
                seed, "--log-samples", "--out", str(out))
        runs[name] = [json.loads(line)["resps"][0] for line in (tmp_path / f"samples_he4_{name}.jsonl").read_text()
                      .splitlines()]
    assert [len(r) for r in runs["a"]] == [4, 4] and len(set(runs["a"][0])) > 1
    assert runs["a"] == runs["b"] and runs["a"] != runs["c"]


@pytest.mark.parametrize("aggregation,values", [
    ("perplexity", [-1.5, -0.2, -3.1, -0.7, -2.2, -0.9, -1.1]),
    ("median", [0.3, 0.9, 0.1, 0.5, 0.7, 0.2]),
    ("f1", [(1, 1), (0, 1), (1, 0), (1, 1), (0, 0), (1, 1), (0, 0)]),
    ("matthews_corrcoef", [(1, 1), (0, 1), (2, 0), (1, 1), (0, 0), (2, 2), (0, 2), (1, 1)]),
])
def test_bootstrap_stderr_equals_lm_evals(monkeypatch, aggregation, values):
    """The same resamples as lm-eval's bootstrap_stderr (seeded per chunk), so the same standard error."""
    require("lm_eval")
    from lm_eval.api import metrics as lm

    monkeypatch.setenv("DISABLE_MULTIPROC", "1")
    fn = {"perplexity": lm.perplexity, "median": lm.median, "f1": lm.f1_score,
          "matthews_corrcoef": lm.matthews_corrcoef}[aggregation]
    assert M.AGGREGATIONS[aggregation](values) == pytest.approx(fn(values), abs=1e-12)
    value, stderr = M.aggregate(aggregation, values, bootstrap_iters=2000)
    assert stderr == pytest.approx(lm.bootstrap_stderr(fn, values, iters=2000), rel=1e-9)


def test_groups_read_lm_eval_yamls_and_bad_ones_fail_clearly(tmp_path):
    """Tags, nested and inline entries resolve; a cycle, an unknown name and a non-mean aggregate are one-line
    errors naming the group."""
    d = tmp_path / "tasks"
    group = mmlu_local(d)
    [g] = G.load([str(group)])
    assert [t.name for t in g.leaves()] == ["local_mmlu_anatomy", "local_mmlu_astronomy",
                                            "local_mmlu_high_school_biology"]
    assert [t.docs[0]["subject"] for t in g.leaves()] == list(SUBJECTS)
    inline = d / "inline.yaml"
    inline.write_text(json.dumps({"group": "inline", "task": [{"task": "local_mmlu_anatomy", "num_fewshot": 2},
                                                             {"group": "sub", "task": ["mmlu_local_stem_tasks"]}]}))
    [g] = G.load([str(inline)])
    assert g.leaves()[0].get("num_fewshot") == 2 and len(g.leaves()) == 3
    (d / "loop.yaml").write_text(json.dumps({"group": "loop", "task": ["loop"]}))
    (d / "unknown.yaml").write_text(json.dumps({"group": "unknown", "task": ["no_such_task"]}))
    (d / "median.yaml").write_text(json.dumps({"group": "median", "task": ["local_mmlu_anatomy"],
                                               "aggregate_metric_list": [{"metric": "acc", "aggregation": "median"}]}))
    for name, message in (("loop", "group loop contains itself"), ("unknown", "unknown task 'no_such_task'"),
                          ("median", "aggregation mean")):
        with pytest.raises(T.TaskError, match=message):
            G.load([str(d / f"{name}.yaml")])
    assert len(G.build_index([]).groups) == 5 and len(G.build_index([]).tags["mmlu_stem_tasks"]) == 19
