#!/usr/bin/env bash
# Learning on the real model (issue 13's acceptance): SmolLM2-135M-Instruct, LoRA, on CPU, bounded steps.
# Reward model and DPO on HH-RLHF pairs (held out: the run's data.val_size split, 100 pairs), PPO against
# the 90-step reward model, GRPO on GSM8K. Each run prints its held-out numbers before and after; the README's
# alignment section quotes them (2026-12-05, 2 cores). Usage: bash bench/align_learning.sh [OUT_ROOT] (~75 min)
set -euo pipefail
OUT=${1:-runs/align-learning}
LF="${PYTHON:-.venv/bin/python} -m lmforge"
HELD="data.val_size=100 train.eval_batches=25 log.progress=false"
FORMAT='"Solve the math problem step by step, then write the final answer on its own last line as: #### <number>. For example, if the answer is 42, the last line is: #### 42"'

$LF align configs/align/smollm2-reward-hh.yaml out_dir=$OUT/reward-long train.max_steps=150 train.eval_every=75 \
    train.lr=5e-4 $HELD | tail -8
$LF align configs/align/smollm2-reward-hh.yaml out_dir=$OUT/reward train.max_steps=90 train.eval_every=45 \
    train.lr=2e-4 $HELD | tail -8
$LF align configs/align/smollm2-dpo-hh.yaml out_dir=$OUT/dpo train.max_steps=60 train.eval_every=30 \
    train.lr=1e-4 $HELD | tail -8
$LF align configs/align/smollm2-ppo-hh.yaml out_dir=$OUT/ppo ppo.reward_model=$OUT/reward train.max_steps=16 \
    train.ckpt_every=8 ppo.eval_prompts=24 log.progress=false | tail -8
$LF align configs/align/smollm2-grpo-gsm8k.yaml out_dir=$OUT/grpo-format train.max_steps=10 train.ckpt_every=10 \
    grpo.eval_prompts=24 grpo.num_generations=8 train.micro_batch_size=16 grpo.max_completion_length=160 \
    train.lr=2e-4 "data.system_prompt=$FORMAT" log.progress=false | tail -12
$LF align configs/align/smollm2-grpo-gsm8k.yaml out_dir=$OUT/grpo train.max_steps=16 train.ckpt_every=8 \
    grpo.eval_prompts=24 log.progress=false | tail -12
