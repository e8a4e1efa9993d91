#!/usr/bin/env bash
# Pretraining throughput on one GPU: tokens/s, MFU and peak memory for presets 124m and 1b at seq 2048,
# bf16, torch.compile, flash SDPA (LeanLlama calls F.scaled_dot_product_attention(is_causal=True) on CUDA).
# Target: MFU >= 50 % (llm-foundry MPT-7B 46 % on H100; torchtitan Llama-3-8B 33-39 %; TinyLlama 56 % on A100).
#
#   bash bench/gpu_pretrain.sh --dry-run    # CPU, preset tiny stands in for both rows, < 1 min: proves the pipeline
#   bash bench/gpu_pretrain.sh              # one CUDA GPU, <= ~6 min; the table goes to stdout and to $OUT/ if set
# Python: $PYTHON, else .venv/bin/python if present, else python3. With network, a CUDA venv is
#   make venv TORCH_SPEC='torch --index-url https://download.pytorch.org/whl/cu124' && bash bench/gpu_pretrain.sh
# The lent GPU machine has no network; its python3 holds CUDA torch + transformers but no pydantic. Download the
# wheels here and carry .whl (the script installs them into a temp dir when pydantic is missing):
#   echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 -d .whl pydantic==2.14.4 pydantic_core==2.50.5 \
#     annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
#   then, there: PYTHON=python3 bash bench/gpu_pretrain.sh     (device tool: carry [".whl"], timeout_s 420)
# Knobs (env): STEPS (40), MBS_124M (16), MBS_1B (8), TIMEOUT_124M (140), TIMEOUT_1B (200) seconds per run,
# BUDGET_S (350) for the whole script, BENCH_TMP (scratch dir; default /dev/shm if it has 20 GB free, else /tmp).
# Each run ends with the engine's final checkpoint (1b: ~4.4 GB safetensors + ~8.8 GB optimizer state, tens of
# seconds on disk, inside the run's timeout); it is deleted right after: only metrics.jsonl and config.yaml stay.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
DRY=0
[[ ${1:-} == --dry-run ]] && DRY=1
START=$SECONDS
BUDGET_S=${BUDGET_S:-350}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
if [[ -d .whl ]] && ! "$PY" -c "import pydantic" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/bench-site .whl/*.whl
  export PYTHONPATH="/tmp/bench-site:$PYTHONPATH"
fi

if (( DRY )); then
  VOCAB=512 NTOK=20000 WARMUP=1 SCRATCH=/tmp
  declare -A MBS=([124m]=4 [1b]=2) LIMIT=([124m]=${TIMEOUT_124M:-60} [1b]=${TIMEOUT_1B:-60})
  COMMON=(model.preset=tiny model.max_seq_len=64 train.max_steps=5 train.precision=fp32 train.compile=false
          train.device=cpu)
else
  VOCAB=32000 NTOK=4000000 WARMUP=10 SCRATCH=/tmp
  (( $(df --output=avail -B1G /dev/shm 2>/dev/null | tail -n 1 || echo 0) >= 20 )) && SCRATCH=/dev/shm
  declare -A MBS=([124m]=${MBS_124M:-16} [1b]=${MBS_1B:-8}) LIMIT=([124m]=${TIMEOUT_124M:-140} [1b]=${TIMEOUT_1B:-200})
  COMMON=(model.max_seq_len=2048 train.max_steps=${STEPS:-40} train.precision=bf16 train.compile=true
          train.device=cuda)
fi
WORK=${BENCH_TMP:-$(mktemp -d "$SCRATCH/lmforge-gpu-bench.XXXXXX")}
LOGS=${OUT:-$WORK}
mkdir -p "$WORK" "$LOGS"

if (( ! DRY )); then  # fail in seconds, not after a compile: imports, CUDA, and the flash kernel for 1b's GQA shapes
  "$PY" -m lmforge info | tee "$LOGS/info.txt"
  "$PY" - <<'PY'
import torch, torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
import lmforge.train.pretrain  # noqa: F401  (pydantic, transformers, safetensors)
assert torch.cuda.is_available(), f"no CUDA device visible to torch {torch.__version__}"
q = torch.randn(8, 32, 2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
kv = torch.randn(8, 4, 2048, 64, device="cuda", dtype=torch.bfloat16)
try:
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True).sum().backward()
    print("preflight: flash SDPA (causal, GQA 32/4, bf16, backward) runs on", torch.cuda.get_device_name(0))
except RuntimeError as e:
    print("WARNING: flash SDPA refused 1b's attention shapes; SDPA will fall back:", str(e).splitlines()[0])
PY
fi
# A val shard shorter than one window: the engine skips its end-of-run eval (and the eval-mode recompile).
"$PY" bench/make_synthetic_shards.py "$WORK/data" --vocab-size "$VOCAB" --n-tokens "$NTOK" --n-val-tokens 16

failed=0 runs=()
for name in 124m 1b; do
  left=$(( BUDGET_S - (SECONDS - START) - 15 ))  # 15 s kept for the summary
  limit=$(( LIMIT[$name] < left ? LIMIT[$name] : left ))
  if (( limit < 10 )); then echo "== $name: skipped, ${left}s of the budget left"; failed=1; continue; fi
  preset=$name
  (( DRY )) && preset=tiny
  rm -rf "${WORK:?}/$name"
  echo "== $name (preset $preset, micro batch ${MBS[$name]}, timeout ${limit}s, log $LOGS/$name.log)"
  t0=$SECONDS
  if timeout -k 10 "$limit" "$PY" -m lmforge pretrain data.dir="$WORK/data" out_dir="$WORK/$name" \
      model.preset="$preset" "${COMMON[@]}" train.micro_batch_size="${MBS[$name]}" train.grad_accum=1 \
      train.log_every=1 train.eval_every=0 train.ckpt_every=0 log.progress=false log.tensorboard=false \
      resume=never >"$LOGS/$name.log" 2>&1; then
    echo "   done in $(( SECONDS - t0 ))s"
  else
    rc=$?
    echo "   FAILED (exit $rc$( (( rc == 124 || rc == 137 )) && echo ', timed out')) after $(( SECONDS - t0 ))s:"
    tail -n 20 "$LOGS/$name.log"
    failed=1
  fi
  rm -rf "$WORK/$name/checkpoints"
  [[ -s $WORK/$name/metrics.jsonl ]] && runs+=("$WORK/$name")
done

echo
if (( ${#runs[@]} )); then
  "$PY" bench/summarize_metrics.py --warmup "$WARMUP" "${runs[@]}" || failed=1
else
  echo "no run produced metrics"; failed=1
fi
echo "total ${SECONDS}s (budget ${BUDGET_S}s); work dir $WORK"
exit "$failed"
