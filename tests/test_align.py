"""lmforge align and eval preference: data formats, reward functions, rollouts, every algorithm from the CLI,
resume after SIGKILL, and bad input. Tiny Llama models; TRL parity lives in test_align_trl.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import kill_after_checkpoint, read_metrics, run_cli, save_tiny, step_losses


# ---- data ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("align-tiny"), seed=1)


@pytest.fixture
def tok(model_dir):
    """A fresh tokenizer per test: rendering with template=chat gives it a chat template."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)


def hh(i: int, good: str = "Sure, here is how.", bad: str = "No.") -> dict:
    ctx = f"\n\nHuman: question {i}?\n\nAssistant: an answer.\n\nHuman: and then {i}?\n\nAssistant:"
    return {"chosen": ctx + " " + good + f" ({i})", "rejected": ctx + " " + bad + f" [{i}]"}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "hh.jsonl", [hh(i) for i in range(48)])


@pytest.fixture(scope="module")
def math_file(tmp_path_factory) -> Path:
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(32)]
    return write_jsonl(tmp_path_factory.mktemp("math") / "math.jsonl", rows)


def test_preference_formats_render_the_same_pair(tmp_path, tok):
    """Explicit strings, explicit messages and the HH implicit prompt give the same tokens for the same pair."""
    from lmforge.align.data import AlignDataConfig, load_pairs

    prompt, good, bad = "question 1?", "Sure.", "No."
    rows = {
        "strings": {"prompt": prompt, "chosen": good, "rejected": bad},
        "messages": {"prompt": [{"role": "user", "content": prompt}],
                     "chosen": [{"role": "assistant", "content": good}],
                     "rejected": [{"role": "assistant", "content": bad}]},
        "implicit": {"chosen": f"\n\nHuman: {prompt}\n\nAssistant: {good}",
                     "rejected": f"\n\nHuman: {prompt}\n\nAssistant: {bad}"},
    }
    got = {}
    for name, row in rows.items():
        path = str(write_jsonl(tmp_path / f"{name}.jsonl", [row]))
        d = load_pairs(AlignDataConfig(path=path, val_size=0, template="chat"), tok, 0)
        p = d.train[0]
        got[name] = (p.prompt.tolist(), p.chosen.tolist(), p.rejected.tolist())
    assert got["strings"] == got["messages"] == got["implicit"]
    text = tok.decode(got["strings"][0] + got["strings"][1])
    assert "<|im_start|>user\nquestion 1?" in text and text.endswith("Sure." + tok.eos_token)


def test_template_none_concatenates_raw_strings(tmp_path, tok):
    from lmforge.align.data import AlignDataConfig, load_pairs

    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q: 1+1=", "chosen": " 2", "rejected": " 3"}])
    p = load_pairs(AlignDataConfig(path=str(f), template="none", val_size=0), tok, 0).train[0]
    assert tok.decode(p.prompt) == "Q: 1+1=" and p.chosen.tolist() == tok(" 2")["input_ids"] + [tok.eos_token_id]


def test_bad_pairs_are_counted_with_their_line(tmp_path, tok):
    from lmforge.align.data import AlignDataConfig, load_pairs

    rows = [hh(0), "{not json", {"chosen": "x"}, {"prompt": "p", "chosen": "same", "rejected": "same"},
            {"prompt": "p", "chosen": 3, "rejected": "r"}, hh(1, good="long " * 80), hh(2)]
    f = write_jsonl(tmp_path / "bad.jsonl", rows)
    d = load_pairs(AlignDataConfig(path=str(f), val_size=0, max_length=150, max_prompt_length=100), tok, 0)
    skipped = d.report.skipped.skipped
    assert skipped["missing_rejected"] == 1 and skipped["identical_pair"] == 1 and skipped["non_string_chosen"] == 1
    assert sum(skipped.values()) == 4  # the bad JSON line too
    assert any(e.startswith(f"{f}:3") for e in d.report.skipped.examples)
    assert d.report.truncated == 1 and len(d.train) == 3
    dropped = load_pairs(AlignDataConfig(path=str(f), val_size=0, max_length=150, max_prompt_length=100,
                                         truncation="drop"), tok, 0)
    assert dropped.report.skipped.skipped["too_long"] == 1 and len(dropped.train) == 2


def test_prompts_from_gsm8k_and_hh(tmp_path, tok, math_file, pairs_file):
    from lmforge.align.data import AlignDataConfig, load_prompts

    d = load_prompts(AlignDataConfig(path=str(math_file), val_size=4, system_prompt="Be brief.", template="chat"),
                     tok, 0)
    assert len(d.train) == 28 and len(d.val) == 4 and "answer" in d.train[0].record
    assert "Be brief." in tok.decode(d.train[0].ids)
    h = load_prompts(AlignDataConfig(path=str(pairs_file), val_size=0, template="chat"), tok, 0).train[0]
    assert tok.decode(h.ids).endswith("<|im_start|>assistant\n") and "and then" in tok.decode(h.ids)


# ---- rewards and rollouts --------------------------------------------------------------------------

def test_gsm8k_rewards():
    from lmforge.align.rewards import gsm8k, gsm8k_format, gsm8k_strict

    answers = ["3 + 4 = 7\n#### 7"] * 4
    completions = ["so it is 7.", "The total is 1,000 then 7\n#### 7", "#### 8", "no idea"]
    assert gsm8k([], completions, answer=answers) == [1.0, 1.0, 0.0, 0.0]
    assert gsm8k_strict([], completions, answer=answers) == [0.0, 1.0, 0.0, 0.0]
    assert gsm8k_format([], completions) == [0.0, 1.0, 1.0, 0.0]


def test_reward_function_loading(tmp_path):
    from lmforge.align.rewards import load_reward_function, score

    f = tmp_path / "mine.py"
    f.write_text("def length(prompts, completions, **kw):\n    return [len(c) for c in completions]\n"
                 "def broken(prompts, completions, **kw):\n    raise KeyError('answer')\n")
    assert load_reward_function(f"{f}:length")([], ["ab", "c"]) == [2, 1]
    assert load_reward_function("lmforge.align.rewards:gsm8k_format")([], ["#### 1"]) == [1.0]
    for bad, msg in [("nope", "not built in"), (f"{f}:missing", "has no function"),
                     ("no_such_module_xyz:f", "cannot import"), (f"{tmp_path}/x.py:f", "does not exist")]:
        with pytest.raises(ValueError, match=msg):
            load_reward_function(bad)
    with pytest.raises(RuntimeError, match="broken raised KeyError"):
        score({"broken": load_reward_function(f"{f}:broken")}, ["p"], ["c"], {})


def test_live_generation_follows_the_lora_weights(model_dir):
    """Rollouts see the adapter's current weights (merged on the fly) and repeat exactly under the same seeds."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.infer.engine import SamplingParams
    from lmforge.infer.live import LiveGenerator

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    gen = LiveGenerator(model, tok, [tok.eos_token_id], torch.device("cpu"), torch.float32)
    ids = tok("hello there")["input_ids"]
    greedy = gen.generate([ids], [SamplingParams(max_tokens=12, temperature=0.0)])[0].token_ids
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    assert greedy == ref[:len(greedy)]
    params = [SamplingParams(max_tokens=12, temperature=1.0, n=3, seed=7)]
    assert [c.token_ids for c in gen.generate([ids], params)] == [c.token_ids for c in gen.generate([ids], params)]


# ---- the CLI, end to end ---------------------------------------------------------------------------

COMMON = ["train.log_every=1", "log.progress=false", "train.precision=fp32", "train.threads=1"]


def align_args(kind: str, model_dir: Path, data: Path, *extra: str) -> list[str]:
    return ["align", f"algorithm={kind}", f"base_model={model_dir}", f"data.path={data}", *COMMON, *extra]


@pytest.mark.slow
def test_reward_model_trains_scores_and_exports(tmp_path, model_dir, pairs_file):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "rm"
    p = run_cli(*align_args("reward", model_dir, pairs_file, f"out_dir={out}", "train.max_steps=30", "train.lr=3e-3",
                            "train.eval_every=15", "data.val_size=8", "reward.center_rewards=0.01"))
    assert "held-out accuracy" in p.stdout
    evals = [r for r in read_metrics(out) if "val_accuracy" in r]
    assert evals[-1]["val_accuracy"] > 0.9 and evals[-1]["val_margin"] > evals[0]["val_margin"]
    res = tmp_path / "pref.json"
    run_cli("eval", "preference", str(out), "--data", str(pairs_file), "--out", str(res))
    r = json.loads(res.read_text())
    assert r["n"] == 48 and r["accuracy"] > 0.9 and r["margin"] > 0 and r["scored_by"] == "reward model"
    run_cli("export", str(out), "--merge-lora", "--out", str(tmp_path / "rm-hf"))
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm-hf").eval()
    assert rm.config.num_labels == 1
    # transformers scores an exported pair (padded batch, its own pooling) as lmforge scores it (packed)
    from transformers import AutoTokenizer

    from lmforge.align.data import AlignDataConfig, load_pairs
    from lmforge.align.models import RewardModel, pack, reward_scores

    pair = load_pairs(AlignDataConfig(path=str(pairs_file), val_size=0), AutoTokenizer.from_pretrained(out / "checkpoints" / "step-0000030"), 0).train[0]
    seqs = [(pair.prompt, pair.chosen), (pair.prompt, pair.rejected)]
    ours = reward_scores(RewardModel(rm), pack(seqs))
    width = max(len(p) + len(a) for p, a in seqs)
    ids = torch.tensor([[*p, *a] + [rm.config.pad_token_id] * (width - len(p) - len(a)) for p, a in seqs])
    with torch.no_grad():
        theirs = rm(input_ids=ids, attention_mask=(torch.arange(width)[None] < torch.tensor(
            [[len(p) + len(a)] for p, a in seqs])).long()).logits[:, 0]
    torch.testing.assert_close(ours.detach(), theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_dpo_learns_and_precomputed_reference_matches(tmp_path, model_dir, pairs_file):
    args = ["train.max_steps=6", "train.lr=3e-3", "train.eval_every=3", "data.val_size=8"]
    run_cli(*align_args("dpo", model_dir, pairs_file, f"out_dir={tmp_path / 'a'}", *args))
    run_cli(*align_args("dpo", model_dir, pairs_file, f"out_dir={tmp_path / 'b'}", "dpo.precompute_ref=true", *args))
    assert (tmp_path / "b" / "ref_logps.safetensors").is_file()
    a, b = step_losses(tmp_path / "a"), step_losses(tmp_path / "b")
    assert a == pytest.approx(b, abs=1e-5)
    evals = [r for r in read_metrics(tmp_path / "a") if "val_rewards/margins" in r]
    assert evals[0]["val_rewards/margins"] == 0 and evals[-1]["val_rewards/margins"] > 0
    assert evals[-1]["val_rewards/accuracies"] > 0.5
    p = run_cli("eval", "preference", str(tmp_path / "a"), "--reference", str(model_dir), "--data", str(pairs_file))
    assert "implicit reward" in p.stdout


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["ipo", "hinge", "robust"])
def test_dpo_loss_types_run(tmp_path, model_dir, pairs_file, loss_type):
    run_cli(*align_args("dpo", model_dir, pairs_file, f"out_dir={tmp_path}", "train.max_steps=2", "train.eval_every=0",
                        f"dpo.loss_type={loss_type}", "dpo.label_smoothing=0.1"))
    assert len(step_losses(tmp_path)) == 2


@pytest.mark.slow
def test_grpo_logs_rewards_and_scores_heldout(tmp_path, model_dir, math_file):
    out = tmp_path / "grpo"
    p = run_cli(*align_args("grpo", model_dir, math_file, f"out_dir={out}", "train.max_steps=4",
                            "grpo.num_generations=4", "grpo.max_completion_length=12", "grpo.eval_prompts=4",
                            "data.val_size=4", "train.ckpt_every=2", "grpo.beta=0.04", "grpo.num_iterations=2"))
    lines = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    rollout = [r for r in lines if "reward" in r]
    assert [r["step"] for r in rollout] == [1, 3]  # one rollout per num_iterations steps
    for key in ("rewards/gsm8k/mean", "rewards/gsm8k_format/std", "frac_reward_zero_std", "completions/mean_length",
                "kl", "clip_ratio/region_mean"):
        assert key in rollout[0] or key in lines[0], key
    assert "strict_accuracy" in json.loads((out / "eval_after.json").read_text())
    assert "held-out flexible_accuracy" in p.stdout


@pytest.mark.slow
def test_ppo_with_a_reward_model(tmp_path, model_dir, pairs_file):
    rm = tmp_path / "rm"
    run_cli(*align_args("reward", model_dir, pairs_file, f"out_dir={rm}", "train.max_steps=2", "train.eval_every=0"))
    out = tmp_path / "ppo"
    run_cli(*align_args("ppo", model_dir, pairs_file, f"out_dir={out}", f"ppo.reward_model={rm}", "train.max_steps=8",
                        "ppo.max_completion_length=10", "ppo.num_ppo_epochs=2", "ppo.num_mini_batches=2",
                        "ppo.target_kl=0.5", "ppo.missing_eos_penalty=1.0", "ppo.eval_prompts=4", "data.val_size=4",
                        "train.ckpt_every=4"))
    lines = [r for r in read_metrics(out) if "loss" in r]
    assert "objective/scores" in lines[0] and "objective/kl" in lines[0] and "val/explained_var" in lines[0]
    rollouts = [r for r in lines if "kl_coef" in r]
    assert [r["step"] for r in rollouts] == [1, 5]  # one rollout per num_ppo_epochs x num_mini_batches steps
    assert rollouts[0]["kl_coef"] == 0.05 and rollouts[1]["kl_coef"] != 0.05  # the adaptive controller moved it
    for key in ("policy/clipfrac", "policy/approxkl", "loss/value", "policy/entropy"):
        assert key in lines[-1]
    after = json.loads((out / "eval_after.json").read_text())
    assert {"mean_score", "kl"} <= set(after)
    assert (out / "checkpoints" / "step-0000008" / "value_head.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["reward", "dpo", "grpo", "ppo"])
def test_sigkill_resume_repeats_the_losses(tmp_path, model_dir, pairs_file, math_file, kind):
    """Killed after a checkpoint and run again, every later step's loss equals an uninterrupted run's."""
    extra = {"reward": [], "dpo": [],
             "grpo": ["grpo.num_generations=2", "grpo.max_completion_length=8", "grpo.eval_prompts=0"],
             "ppo": ["ppo.reward_function=lmforge.align.rewards:gsm8k_format", "ppo.max_completion_length=8",
                     "ppo.num_ppo_epochs=1", "ppo.num_mini_batches=2", "ppo.eval_prompts=0", "ppo.target_kl=1.0"]}[kind]
    data = math_file if kind in ("grpo", "ppo") else pairs_file
    args = align_args(kind, model_dir, data, "train.max_steps=8", "train.ckpt_every=2", "train.eval_every=0",
                      "train.lr=1e-3", *extra)
    run_cli(*args, f"out_dir={tmp_path / 'whole'}")
    kill_after_checkpoint(args, tmp_path / "killed", "step-0000004")
    run_cli(*args, f"out_dir={tmp_path / 'killed'}")
    whole, resumed = step_losses(tmp_path / "whole"), step_losses(tmp_path / "killed")
    assert sorted(resumed) == list(range(1, 9))
    assert resumed == pytest.approx(whole, abs=1e-6)


# ---- bad input: one line, before any model loads ---------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["algorithm=dpo", "dpo.loss_type=kto"], "unknown DPO loss_type 'kto'"),
    (["algorithm=grpo", "grpo.loss_type=ppo"], "unknown GRPO loss_type"),
    (["algorithm=grpo", "grpo.num_generations=3"], "does not divide the batch"),
    (["algorithm=grpo", "grpo.rewards=[no_such_module_xyz:f]"], "cannot import no_such_module_xyz"),
    (["algorithm=ppo"], "needs a ppo section"),
    (["algorithm=grpo", "train.ckpt_every=3", "grpo.num_iterations=2"], "not a multiple"),
])
def test_bad_config_is_one_line(tmp_path, model_dir, math_file, extra, message):
    p = run_cli("align", f"base_model={model_dir}", f"data.path={math_file}", f"out_dir={tmp_path}", *extra,
                check=False, timeout=60)
    assert p.returncode != 0 and message in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "config.yaml").exists()


def test_pairs_without_chosen_rejected_fail_before_loading(tmp_path, math_file):
    p = run_cli("align", "algorithm=dpo", "base_model=/nonexistent/model", f"data.path={math_file}",
                f"out_dir={tmp_path}", check=False, timeout=60)
    assert p.returncode != 0 and "a preference file needs prompt/chosen/rejected" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_reward_function_that_raises_stops_before_training(tmp_path, model_dir, math_file):
    f = tmp_path / "bad_reward.py"
    f.write_text("def r(prompts, completions, answer, **kw):\n    return [1 / 0 for _ in completions]\n")
    p = run_cli("align", "algorithm=grpo", f"base_model={model_dir}", f"data.path={math_file}",
                f"out_dir={tmp_path / 'out'}", f"grpo.rewards=[{f}:r]", *COMMON, check=False, timeout=120)
    assert p.returncode != 0 and "raised ZeroDivisionError" in p.stderr and "before training" in p.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_padded_rows_give_the_packed_values(model_dir):
    """data.packing=false (one right-padded row per sequence) computes the same log-probs, values and scores."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from lmforge.align.models import PolicyModel, RewardModel, pack, policy_logps, reward_scores

    seqs = [([5, 6, 7], [8, 9]), ([10], [11, 12, 13, 14]), ([15, 16], [17])]
    torch.manual_seed(0)
    policy = PolicyModel(AutoModelForCausalLM.from_pretrained(model_dir), value_head=True).eval()
    rm = RewardModel(AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)).eval()
    with torch.no_grad():
        packed, rows = policy_logps(policy, pack(seqs), values=True), policy_logps(policy, pack(seqs, rows=True), values=True)
        torch.testing.assert_close(packed[0], rows[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[2], rows[2], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reward_scores(rm, pack(seqs)), reward_scores(rm, pack(seqs, rows=True)),
                                   atol=1e-5, rtol=1e-5)
