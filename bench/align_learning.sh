#!/usr/bin/env bash
# Learning on the real model (issue 13's acceptance): SmolLM2-135M-Instruct, LoRA, on CPU, bounded steps.
# Reward model and DPO on HH-RLHF pairs (held-out pairs = the run's data.val_size split), PPO against that
# reward model, GRPO on GSM8K. Each run prints its held-out numbers before and after; the README's
# alignment section quotes them. Usage: bash bench/align_learning.sh [OUT_ROOT]   (~30 min on 2 cores)
set -euo pipefail
OUT=${1:-runs/align-learning}
LF="${PYTHON:-.venv/bin/python} -m lmforge"
COMMON="log.progress=false"

$LF align configs/align/smollm2-reward-hh.yaml out_dir=$OUT/reward train.max_steps=150 $COMMON | tail -12
$LF align configs/align/smollm2-dpo-hh.yaml out_dir=$OUT/dpo train.max_steps=150 $COMMON | tail -12
$LF align configs/align/smollm2-ppo-hh.yaml out_dir=$OUT/ppo ppo.reward_model=$OUT/reward $COMMON | tail -12
$LF align configs/align/smollm2-grpo-gsm8k.yaml out_dir=$OUT/grpo $COMMON | tail -16
