"""`lmforge align`: reward model, DPO, PPO or GRPO on the training engine, with rollouts on the inference engine.

The stage loads the data (errors before any model), builds the model the algorithm trains (a
sequence classifier for `reward`, a causal LM for the others, PPO's with a value head; full, LoRA or
QLoRA as in `finetune`), hands the engine a `Job`, and for PPO/GRPO scores greedy completions of
held-out prompts before and after training. With LoRA the reference is the base with the adapter
switched off; with full training a frozen copy is loaded only when the algorithm needs one.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.align.config import AlignConfig
from lmforge.align.data import check_preference_file, load_pairs, load_prompts
from lmforge.align.models import PolicyModel, RewardModel, pack, policy_logps, seq_sum
from lmforge.align.pairs import (dpo_objective, eval_pair_batches, pair_batches, pair_tokens, precompute_reference,
                                 reward_objective)
from lmforge.align.rewards import BUILTIN, load_reward_function, score
from lmforge.align.rl import GRPO, PPO, Rollouts, columns, function_scorer, reward_model_scorer
from lmforge.config import dump_config
from lmforge.device import inference_dtype, resolve_precision
from lmforge.errors import UserError
from lmforge.infer.engine import SamplingParams
from lmforge.infer.live import LiveGenerator
from lmforge.infer.prompts import eos_ids
from lmforge.train.distributed import init_runtime, shutdown
from lmforge.train.finetune import build_model, decoder_layers, model_writers, peak_rss_gb, trainable_summary
from lmforge.train.job import Job, RunSpec
from lmforge.train.loop import train
from lmforge.train.metrics import StepMetrics


def preflight(cfg: AlignConfig) -> dict:
    """Everything that can fail without a model: the data's shape and the reward functions (imported and probed)."""
    fns = {}
    if cfg.algorithm in ("reward", "dpo"):
        check_preference_file(cfg.data)
    elif cfg.algorithm == "grpo":
        fns = {name: load_reward_function(name) for name in cfg.grpo.rewards}
    elif cfg.ppo.reward_function:
        fns = {cfg.ppo.reward_function: load_reward_function(cfg.ppo.reward_function)}
    return fns


def probe(fns: dict, record: dict, text: str) -> None:
    """Call each reward function once on a made-up completion, so one that raises stops the run before training."""
    try:
        score(fns, [text], ["The answer is 0.\n#### 0"], columns([record], 1))
    except RuntimeError as e:
        raise UserError(f"{e} (on a test completion, before training)") from None


def _frozen(model: nn.Module) -> nn.Module:
    model.eval().requires_grad_(False)
    return model


def _writers(cfg: AlignConfig, inner: nn.Module, tokenizer):
    """(save, load) for the engine: the inner model's files (adapter or full HF dir) plus PPO's value head;
    engine state-dict names carry the wrapper's `lm.` prefix."""
    save_inner, load_inner = model_writers(cfg, inner, tokenizer)

    def save(d: Path, sd: Mapping) -> None:
        save_inner(d, {k[3:]: sd[k] for k in sd if k.startswith("lm.")})
        head = {k: sd[k] for k in sd if k.startswith("v_head.")}
        if head:
            save_file({k: v.contiguous() for k, v in head.items()}, str(d / "value_head.safetensors"))

    def load(d: Path) -> dict:
        sd = {f"lm.{k}": v for k, v in load_inner(d).items()}
        if (d / "value_head.safetensors").is_file():
            sd.update(load_file(str(d / "value_head.safetensors")))
        return sd
    return save, load


@torch.no_grad()
def heldout_scores(cfg: AlignConfig, gen: LiveGenerator, policy: PolicyModel, prompts: list, fns: dict,
                   scorer=None, ref_model=None) -> dict:
    """Greedy completions of held-out prompts, scored: each reward function's mean (GRPO; GSM8K records also get
    strict and flexible accuracy), or the reward model's mean score and the KL to the reference (PPO)."""
    sampling = cfg.grpo if cfg.algorithm == "grpo" else cfg.ppo
    if not prompts:
        return {}
    params = [SamplingParams(max_tokens=sampling.max_completion_length, temperature=0.0)] * len(prompts)
    done = gen.generate([p.ids for p in prompts], params)
    ids = [c.token_ids or [gen.tok.eos_token_id] for c in done]
    texts = [gen.tok.decode(t, skip_special_tokens=True) for t in ids]
    cols = columns([p.record for p in prompts], 1)
    out = {"n": len(prompts), "mean_length": sum(map(len, ids)) / len(ids)}
    checks = dict(fns)
    if "answer" in cols:
        checks.update({"strict_accuracy": BUILTIN["gsm8k_strict"], "flexible_accuracy": BUILTIN["gsm8k"],
                       "format": BUILTIN["gsm8k_format"]})
    for name, values in score(checks, [p.text for p in prompts], texts, cols).items():
        valid = [v for v in values if v == v]
        out[name] = sum(valid) / len(valid) if valid else None
    if scorer is not None:
        seqs = [(p.ids, t) for p, t in zip(prompts, ids)]
        out["mean_score"] = float(scorer(seqs, texts, prompts).mean())
        was = policy.training
        policy.eval()
        kl = []
        for lo in range(0, len(seqs), cfg.train.micro_batch_size):
            batch = pack(seqs[lo:lo + cfg.train.micro_batch_size])
            lp = policy_logps(policy, batch)[0]
            if ref_model is not None:
                ref = policy_logps(ref_model, batch)[0]
            else:
                with policy.reference():
                    ref = policy_logps(policy, batch)[0]
            kl.append(seq_sum(lp - ref, batch["seg"], len(batch["answer_tokens"])))
        policy.train(was)
        out["kl"] = float(torch.cat(kl).mean())
    out["examples"] = [{"prompt": p.text[-300:], "completion": t} for p, t in list(zip(prompts, texts))[:3]]
    return out


def align(cfg: AlignConfig) -> dict:
    """Train per `cfg`; resumes from out_dir/checkpoints/latest when it exists (resume=auto)."""
    from lmforge.model.load import load_model, load_tokenizer

    fns = preflight(cfg)
    tc = cfg.train
    rt = init_runtime(tc.device, tc.parallel, tc.threads)
    try:
        precision = resolve_precision(tc.precision, rt.device)
        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        tokenizer = load_tokenizer(cfg.base_model)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        pairs = cfg.algorithm in ("reward", "dpo")
        data = load_pairs(cfg.data, tokenizer, cfg.seed) if pairs else load_prompts(cfg.data, tokenizer, cfg.seed)
        if fns:
            probe(fns, data.train[0].record, data.train[0].text)
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        if rt.is_main:
            dump_config(cfg, cfg.out_dir / "config.yaml")
            (cfg.out_dir / "data_report.json").write_text(json.dumps(data.report.to_dict(), indent=2) + "\n")
            print(data.report.summary(), flush=True)

        torch.manual_seed(cfg.seed)  # LoRA and head initialisation are the same on every rank and every run
        metrics = StepMetrics()
        inner = build_model(cfg, precision, rt.device, head="score" if cfg.algorithm == "reward" else "lm")
        ref_model = None
        needs_ref = cfg.algorithm in ("dpo", "ppo") or (cfg.algorithm == "grpo" and cfg.grpo.beta > 0)
        if needs_ref and cfg.method == "full":
            ref_model = _frozen(PolicyModel(load_model(cfg.base_model, dtype=compute, device=rt.device)))
        extra, before = None, None
        rows = not cfg.data.packing
        eval_batches = None
        if cfg.algorithm == "reward":
            inner.config.pad_token_id = tokenizer.pad_token_id
            model = RewardModel(inner)
            objective = reward_objective(cfg.reward.center_rewards, metrics)
            train_batches = pair_batches(data.train, cfg.seed, rows)
            eval_batches = eval_pair_batches(data.val, rows) if data.val else None
        elif cfg.algorithm == "dpo":
            model = PolicyModel(inner)
            table = None
            if cfg.dpo.precompute_ref and rt.is_main:
                table = precompute_reference(cfg.out_dir / "ref_logps.safetensors", data.train, model.to(rt.device),
                                             ref_model, tc.micro_batch_size)
            objective = dpo_objective(cfg.dpo.beta, cfg.dpo.loss_type, cfg.dpo.label_smoothing, ref_model, table,
                                      metrics)
            train_batches = pair_batches(data.train, cfg.seed, rows)
            eval_batches = eval_pair_batches(data.val, rows) if data.val else None
        else:
            model = PolicyModel(inner, value_head=cfg.algorithm == "ppo").to(rt.device)
            eos = eos_ids(inner, tokenizer)
            gen = LiveGenerator(inner, tokenizer, eos, rt.device, inference_dtype(rt.device, "auto"),
                                max_model_len=cfg.data.max_prompt_length + (cfg.grpo if cfg.algorithm == "grpo"
                                                                           else cfg.ppo).max_completion_length + 1)
            sampling = cfg.grpo if cfg.algorithm == "grpo" else cfg.ppo
            rollouts = Rollouts(model, tokenizer, eos, data.train, cfg.seed, sampling, gen, metrics, rows)
            n_eval = sampling.eval_prompts
            scorer = None
            if cfg.algorithm == "grpo":
                rl = GRPO(rollouts, cfg.grpo, fns, tc.micro_batch_size, metrics)
            else:
                if cfg.ppo.reward_model:
                    rm = _frozen(RewardModel(load_model(cfg.ppo.reward_model, dtype=compute, device=rt.device,
                                                        head="score", merge_adapter=True)))
                    scorer = reward_model_scorer(rm, tc.micro_batch_size)
                else:
                    scorer = function_scorer(cfg.ppo.reward_function, fns[cfg.ppo.reward_function])
                rl = extra = PPO(rollouts, cfg.ppo, scorer, ref_model, tc.micro_batch_size, cfg.seed, metrics)
            objective, train_batches = rl.objective, rl.batches
            fresh = not (cfg.out_dir / "checkpoints").is_dir() or cfg.resume == "never"
            if rt.is_main and fresh and n_eval:
                before = heldout_scores(cfg, gen, model, data.val[:n_eval], fns if cfg.algorithm == "grpo" else {},
                                        scorer, ref_model)
                (cfg.out_dir / "eval_before.json").write_text(json.dumps(before, indent=2) + "\n")
        trainable, total, line = trainable_summary(model)
        if rt.is_main:
            print(line, flush=True)
        save_model, load_model_sd = _writers(cfg, inner, tokenizer)
        job = Job(model=model, objective=objective, train_batches=train_batches, eval_batches=eval_batches,
                  save_model=save_model, load_model=load_model_sd, batch_tokens=pair_tokens,
                  trainable_only=cfg.method != "full", blocks=decoder_layers(inner), metrics=metrics,
                  extra_state=(extra.state, extra.load_state) if extra is not None else None)
        spec = RunSpec(cfg.out_dir, cfg.resume, tc, cfg.guards, cfg.log, cfg.model_dump(mode="json"))
        summary = train(job, spec, rt)
        if cfg.algorithm in ("ppo", "grpo") and rt.is_main and sampling.eval_prompts:
            after = heldout_scores(cfg, gen, model, data.val[:sampling.eval_prompts],
                                   fns if cfg.algorithm == "grpo" else {}, scorer, ref_model)
            (cfg.out_dir / "eval_after.json").write_text(json.dumps(after, indent=2) + "\n")
            summary["heldout_after"] = after
            if before is None and (cfg.out_dir / "eval_before.json").is_file():
                before = json.loads((cfg.out_dir / "eval_before.json").read_text())
            summary["heldout_before"] = before
        summary.update({"method": cfg.method, "algorithm": cfg.algorithm, "trainable_params": trainable,
                        "total_params": total, "peak_rss_gb": peak_rss_gb(), "data": data.report.to_dict(),
                        "rank": rt.rank, "heldout": _heldout_lines(cfg.out_dir)})
        return summary
    finally:
        shutdown(rt)


def _heldout_lines(out_dir: Path) -> list[dict]:
    """The eval lines of metrics.jsonl (first and last), for the summary."""
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [json.loads(x) for x in path.read_text().splitlines() if '"val_loss"' in x]
    return [lines[0], lines[-1]] if lines else []
