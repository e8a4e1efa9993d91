"""lmforge eval tasks / compare / --bridge: lm-eval's prompts, scores and metrics, checked against lm-eval itself."""
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
from lmforge.eval import tasks as T

DATA = ROOT / "tests" / "data" / "eval"
LMEVAL = ROOT / "tests" / "data" / "lmeval"
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k_train.jsonl"

pytestmark = pytest.mark.usefixtures("hub_offline")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=4)


@pytest.fixture
def gsm8k_dir(tmp_path):
    """DIR/gsm8k/{test,train}.jsonl cut from the shared GSM8K training file (or a few made-up rows without it)."""
    if GSM8K.is_file():
        lines = GSM8K.read_text().splitlines()[:40]
    else:
        lines = [json.dumps({"question": f"Tom has {i} apples and buys {i + 2} more. How many apples does he have?",
                             "answer": f"He has {i} + {i + 2} = {2 * i + 2} apples.\n#### {2 * i + 2}"})
                 for i in range(40)]
    d = tmp_path / "data" / "gsm8k"
    d.mkdir(parents=True)
    (d / "test.jsonl").write_text("\n".join(lines[:6]) + "\n")
    (d / "train.jsonl").write_text("\n".join(lines[6:]) + "\n")
    return tmp_path / "data"


def local_yaml(tmp_path: Path, name: str, data_dir: Path) -> Path:
    """The built-in task over local files, as a YAML that lm-eval reads too (include + json data files)."""
    files = {p.stem: str(p) for p in (data_dir / name).glob("*.jsonl")}
    builtin = next(T.BUILTIN_DIR.rglob(f"{name}.yaml"))
    cfg = {"include": str(builtin), "task": f"{name}_local", "dataset_path": "json",
           "dataset_name": None, "dataset_kwargs": {"data_files": files}}
    path = tmp_path / "tasks" / f"{name}_local.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


class Recorder:
    """A stand-in model that records requests; generation answers from a table of canned texts."""

    def __init__(self, answers=None):
        self.answers = answers or {}
        self.prompts = []

    def generate_until(self, contexts, until, max_gen_toks, sampling=None, n=1, seed=1234):
        assert sampling is None and n == 1, "these tasks generate greedily, once"
        self.prompts += contexts
        return [self.answers.get(i, "") for i in range(len(contexts))]

    def close(self):
        pass


def our_requests(task: T.Task, shots: int, limit: int) -> list:
    sampler = T.FewshotSampler(task)
    out = []
    for doc in task.docs[:limit]:
        ctx = T.context(task, doc, sampler.sample(shots, doc))
        if task.output_type == "multiple_choice":
            out += [(ctx, task.get("target_delimiter", " ") + c) for c in T.doc_to_choice(task, doc)]
        else:
            out.append(ctx)
    return out


@pytest.mark.parametrize("name,shots", [("hellaswag", 2), ("arc_easy", 2), ("arc_challenge", 0), ("mmlu_anatomy", 5),
                                        ("truthfulqa_mc1", 0), ("gsm8k", 5), ("humaneval", 0)])
def test_builtin_prompts_equal_lm_evals(tmp_path, gsm8k_dir, name, shots):
    require("lm_eval")
    from lm_eval.tasks import TaskManager, get_task_dict

    path = local_yaml(tmp_path, name, gsm8k_dir if name == "gsm8k" else DATA)
    ours = G.load([str(path)])[0]
    theirs = get_task_dict([f"{name}_local"], TaskManager(include_path=str(path.parent)))[f"{name}_local"]
    theirs.set_fewshot_seed(seed=T.FEWSHOT_SEED)
    theirs.set_config(key="num_fewshot", value=shots)
    theirs.build_all_requests(limit=len(ours.docs), rank=0, world_size=1)
    want = [i.args if i.request_type == "loglikelihood" else i.args[0] for i in theirs.instances]
    got = our_requests(ours, shots, len(ours.docs))
    assert got == want
    if name == "gsm8k":
        until = theirs.instances[0].args[1]["until"]
        assert until == ours.get("generation_kwargs")["until"]


@pytest.mark.slow
def test_multiple_choice_yaml_equals_lm_eval_hf(tmp_path, tiny):
    """The same YAML (3-shot, drawn from the test split itself) under `lm_eval --model hf` and `lmforge eval tasks`."""
    require("lm_eval")
    task = tmp_path / "tasks" / "mc3.yaml"
    task.parent.mkdir()
    task.write_text((LMEVAL / "lmforge_mc.yaml").read_text().replace("task: lmforge_mc", "task: mc3")
                    .replace("tests/data/lmeval/mc.jsonl", str(LMEVAL / "mc.jsonl")) + "num_fewshot: 3\n")
    env = {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={tiny},dtype=float32", "--device", "cpu", "--batch_size", "4",
                           "--include_path", str(task.parent), "--tasks", "mc3", "--log_samples",
                           "--output_path", str(tmp_path / "lm-eval")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [res] = (tmp_path / "lm-eval").rglob("results_*.json")
    want = json.loads(res.read_text())["results"]["mc3"]
    [samples] = (tmp_path / "lm-eval").rglob("samples_mc3_*.jsonl")
    want_lls = [[r[0][0] for r in json.loads(line)["resps"]] for line in samples.read_text().splitlines()]

    out = tmp_path / "ours.json"
    p = run_cli("eval", "tasks", str(tiny), "--tasks", str(task), "--device", "cpu", "--out", str(out))
    assert "acc_norm" in p.stdout
    got = json.loads(out.read_text())["results"]["mc3"]
    assert got["n_samples"] == 30 and got["num_fewshot"] == 3
    for key in ("acc", "acc_norm"):
        assert got[key] == want[f"{key},none"], key
        assert got[f"{key}_stderr"] == pytest.approx(want[f"{key}_stderr,none"], rel=1e-9)

    from lmforge.eval.lm import EvalModel  # and every choice's log-likelihood, not only the argmax
    model = EvalModel.load(str(tiny), device="cpu")
    task_obj = G.load([str(task)])[0]
    reqs = our_requests(task_obj, 3, 30)
    lls = [ll for ll, _ in model.loglikelihood([model.encode_pair(c, x) for c, x in reqs])]
    flat = [float(x) for doc in want_lls for x in doc]  # lm-eval logs them as strings
    assert lls == pytest.approx(flat, abs=1e-4)


def test_smollm2_matches_lm_eval_hf_numbers(smollm2_cache):
    """lm_eval --model hf gives acc 0.5667 / acc_norm 0.7000 and exact_match 0.7143 on these two YAML tasks
    (tests/test_serve_lmeval.py runs it); lmforge's own scoring gives the same."""
    p = run_cli("eval", "tasks", "smollm2-135m-instruct", "--tasks",
                f"{LMEVAL / 'lmforge_mc.yaml'},{LMEVAL / 'lmforge_qa.yaml'}", "--device", "cpu", "--out",
                str(smollm2_cache / "r.json"), env={"LMFORGE_CACHE": str(smollm2_cache)})
    got = json.loads((smollm2_cache / "r.json").read_text())["results"]
    assert round(got["lmforge_mc"]["acc"], 4) == 0.5667 and round(got["lmforge_mc"]["acc_norm"], 4) == 0.7
    assert round(got["lmforge_qa"]["exact_match,strip"], 4) == 0.7143, p.stdout


def test_gsm8k_exact_match_on_gsm8k_shaped_data(gsm8k_dir):
    """lm-eval's two GSM8K extractions: `#### N` (strict) and the last number (flexible)."""
    task = G.load(["gsm8k"], gsm8k_dir)[0]
    golds = [d["answer"].split("#### ")[-1] for d in task.docs]
    answers = {0: f"Some steps.\n#### {golds[0]}",           # strict and flexible
               1: f"So the answer is {golds[1]}.",             # flexible only: no ####
               2: "#### 123456789",                            # wrong number
               3: f"#### {int(golds[3].replace(',', '')):,}"}  # a thousands comma is ignored
    model = Recorder(answers)
    r = harness.run_task(model, task, limit=4)
    assert r["exact_match,strict-match"] == pytest.approx(2 / 4)
    assert r["exact_match,flexible-extract"] == pytest.approx(3 / 4)
    assert r["num_fewshot"] == 5 and len(model.prompts) == 4
    assert model.prompts[0].count("Question:") == 6 and model.prompts[0].endswith(
        f"Question: {task.docs[0]['question']}\nAnswer:")


def test_gsm8k_from_the_cli(tmp_path, tiny, gsm8k_dir):
    out = tmp_path / "r.json"
    run_cli("eval", "tasks", str(tiny), "--tasks", "gsm8k", "--data-dir", str(gsm8k_dir), "--limit", "2",
            "--num-fewshot", "1", "--device", "cpu", "--out", str(out))
    r = json.loads(out.read_text())["results"]["gsm8k"]
    assert r["n_samples"] == 2 and r["num_fewshot"] == 1
    assert {"exact_match,strict-match", "exact_match_stderr,strict-match", "exact_match,flexible-extract"} <= set(r)


def test_humaneval_pass_at_1_in_the_sandbox(tmp_path):
    """Completions: right, wrong, an endless loop, and one that writes outside its temp dir: pass@1 = 1/4."""
    from lmforge.eval import sandbox

    try:
        sandbox.run_program("pass", timeout_s=5)
    except sandbox.SandboxUnavailable as e:
        if os.environ.get("CI"):  # .ci/run's Linux machine can sandbox; elsewhere the platform may not
            raise
        pytest.skip(str(e))
    victim = tmp_path / "written-by-model.txt"
    answers = {0: "    return a + b\n",
               1: "    return n % 2 == 1\n",
               2: "    while True:\n        pass\n",
               3: f"    open({str(victim)!r}, 'w').write('x')\n    return s[::-1]\n"}
    task = G.load(["humaneval"], DATA)[0]
    r = harness.run_task(Recorder(answers), task)
    assert r["pass@1,create_test"] == pytest.approx(0.25)
    assert not victim.exists()


def test_compare_shows_deltas_with_standard_errors(tmp_path):
    a = {"results": {"mc": {"acc": 0.5, "acc_stderr": 0.03, "acc_norm": 0.6, "acc_norm_stderr": 0.04}}}
    b = {"results": {"mc": {"acc,none": 0.56, "acc_stderr,none": 0.04, "alias": "mc"}}}  # lm-eval's own format
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    p = run_cli("eval", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert "| mc | acc | 0.5000 | 0.5600 | +0.0600 | 0.0500 | +1.20 |" in p.stdout  # sqrt(.03²+.04²) = .05
    assert "acc_norm" not in p.stdout.split("| mc | acc |")[1]


@pytest.mark.parametrize("args,message", [
    (["--tasks", "no_such_task"], "unknown task 'no_such_task'"),
    (["--tasks", "{tmp}/missing.yaml"], "no such task file"),
    (["--tasks", "{tmp}/bad_key.yaml"], "unsupported key(s) doc_to_image"),
    (["--tasks", "{tmp}/repeats.yaml"], "repeats must be a positive integer"),
    (["--tasks", "{tmp}/no_data.yaml"], "data file {tmp}/nowhere.jsonl not found"),
    (["--tasks", "{tmp}/broken_data.yaml"], "could not load its data"),
    (["--tasks", "{tmp}/bad_filter.yaml"], "filter function 'majority_vote' is not supported"),
    (["--tasks", "{tmp}/group.yaml"], "unknown task 'lmforge_mcq'"),
    (["--tasks", "{qa}", "--fewshot-as-multiturn"], "--fewshot-as-multiturn needs --apply-chat-template"),
    (["--tasks", "{qa}", "--log-samples"], "give --out FILE.json too"),
    (["--tasks", "{qa}", "--include-path", "{tmp}/nowhere"], "--include-path {tmp}/nowhere: no such directory"),
    (["--tasks", "hellaswag", "--data-dir", "{tmp}/empty"], "hellaswag"),
    (["--tasks", "hellaswag", "--data-dir", "{tmp}/nowhere"], "--data-dir"),
    (["--tasks", "{mc}", "--limit", "0"], "--limit must be positive"),
])
def test_bad_tasks_give_one_line_errors(tmp_path, tiny, args, message):
    base = (LMEVAL / "lmforge_mc.yaml").read_text().replace("tests/data/lmeval/mc.jsonl", str(LMEVAL / "mc.jsonl"))
    (tmp_path / "bad_key.yaml").write_text(base + "doc_to_image: img\n")
    (tmp_path / "repeats.yaml").write_text((LMEVAL / "lmforge_qa.yaml").read_text() + "repeats: 0\n")
    (tmp_path / "no_data.yaml").write_text(base.replace(str(LMEVAL / "mc.jsonl"), str(tmp_path / "nowhere.jsonl")))
    (tmp_path / "broken.jsonl").write_text('{"question": "q", "choices": ["a"], "answer": 0}\n{not json\n')
    (tmp_path / "broken_data.yaml").write_text(base.replace(str(LMEVAL / "mc.jsonl"), str(tmp_path / "broken.jsonl")))
    (tmp_path / "bad_filter.yaml").write_text((LMEVAL / "lmforge_qa.yaml").read_text().replace(
        "function: remove_whitespace", "function: majority_vote"))
    (tmp_path / "group.yaml").write_text("group: both\ntask:\n  - lmforge_mcq\n  - lmforge_qa\n")
    (tmp_path / "empty").mkdir()
    args = [a.format(tmp=tmp_path, mc=LMEVAL / "lmforge_mc.yaml", qa=LMEVAL / "lmforge_qa.yaml") for a in args]
    p = run_cli("eval", "tasks", str(tiny), *args, "--device", "cpu", check=False)
    assert p.returncode == 2, p.stdout + p.stderr
    error = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and message.format(tmp=tmp_path) in error[0], p.stderr[-2000:]


def test_compare_bad_inputs(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    (tmp_path / "y.json").write_text(json.dumps({"results": {"other": {"acc": 1.0}}}))
    (tmp_path / "z.json").write_text(json.dumps({"results": {"mc": {"acc": 1.0}}}))
    for a, b, message in [("missing.json", "z.json", "no such results file"), ("x.json", "z.json", "no `results`"),
                          ("y.json", "z.json", "share no task metric")]:
        p = run_cli("eval", "compare", str(tmp_path / a), str(tmp_path / b), check=False)
        assert p.returncode == 2 and message in p.stderr, p.stderr


@pytest.mark.slow
def test_bridge_runs_the_same_yaml_through_lm_eval(tmp_path, tiny):
    require("lm_eval")
    task = str(LMEVAL / "lmforge_mc.yaml")
    native, bridged = tmp_path / "native.json", tmp_path / "bridged.json"
    run_cli("eval", "tasks", str(tiny), "--tasks", task, "--device", "cpu", "--out", str(native))
    run_cli("eval", "tasks", str(tiny), "--tasks", task, "--device", "cpu", "--bridge", "lm-eval",
            "--out", str(bridged))
    a = json.loads(native.read_text())["results"]["lmforge_mc"]
    b = json.loads(bridged.read_text())["results"]["lmforge_mc"]
    assert (a["acc"], a["acc_norm"], a["n_samples"]) == (b["acc"], b["acc_norm"], b["n_samples"])


@pytest.mark.slow
def test_rolling_task_native_bridge_and_perplexity_agree(tmp_path, tiny):
    """A loglikelihood_rolling YAML gives `eval perplexity`'s word/byte perplexity and bits per byte, natively and
    through the lm-eval bridge (where lm-eval aggregates lmforge's per-document log-likelihoods)."""
    require("lm_eval")
    from conftest import synthetic_text

    text = synthetic_text(3000, seed=9)
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": text[i: i + 500]}) + "\n" for i in range(0, 3000, 500)))
    task = tmp_path / "tasks" / "roll.yaml"
    task.parent.mkdir()
    task.write_text(f"task: roll\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                    "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\n"
                    "doc_to_target: '{{text}}'\n")
    outs = {}
    for name, extra in (("native", []), ("bridge", ["--bridge", "lm-eval"])):
        outs[name] = tmp_path / f"{name}.json"
        run_cli("eval", "tasks", str(tiny), "--tasks", str(task), "--max-length", "128", "--device", "cpu",
                "--out", str(outs[name]), *extra)
    run_cli("eval", "perplexity", str(tiny), "--data", str(data), "--max-length", "128", "--device", "cpu",
            "--out", str(tmp_path / "ppl.json"))
    want = json.loads((tmp_path / "ppl.json").read_text())
    for name, out in outs.items():
        got = json.loads(out.read_text())["results"]["roll"]
        for key in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), (name, key)
