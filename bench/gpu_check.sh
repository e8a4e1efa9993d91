#!/usr/bin/env bash
# One GPU check: every CUDA path of lmforge in one run of under 9 minutes on one H100/H200, one table at the end.
#
#   bash bench/gpu_check.sh --dry-run          # CPU, tiny preset and tiny models, ~2 min: proves every section
#   bash bench/gpu_check.sh                    # one CUDA GPU; the table goes to stdout and to $OUT/gpu_check.md
#   bash bench/gpu_check.sh [--dry-run] --section NAME   # one section alone (names below), its rows only
#
# Sections, in order (each its own process under its own timeout; the budget left caps every timeout):
#   env       torch/CUDA/device, and which optional parts (peft, bitsandbytes) this Python has
#   pretrain  bench/gpu_pretrain.sh: tokens/s, MFU, peak memory for presets 124m and 1b at seq 2048
#             (bf16, torch.compile, flash SDPA; it preflights the flash kernel on 1b's GQA shapes)
#   fsdp      torchrun, train.parallel=fsdp, preset 124m: sharded (DCP, background) checkpoint at step K, a new run resumes from it
#             (resume=PATH), its losses K+1..2K are compared with the uninterrupted run's
#   model     a ~1B Llama (preset 1b, random init, bf16, character tokenizer) saved as an HF directory:
#             the model the next three sections load (nothing comes from a hub)
#   qlora     lmforge finetune method=qlora (4-bit NF4 base + LoRA) on it: tokens/s, peak memory
#   serve     the serving engine (continuous batching on the fused runner, what `lmforge serve` puts behind
#             HTTP) on it: output tokens/s with 8 and 32 sequences in flight
#   eval      lmforge eval perplexity on it in bf16: tokens/s
#   deepspeed torchrun, a ZeRO-3 ds_config on DeepSpeed's own engine (preset 124m, bf16): tokens/s, peak memory,
#             checkpoint + resume, HF weights at the end (skipped when deepspeed does not import; on the dry
#             run LMFORGE_DEEPSPEED_ENGINE=1 runs it on the CPU, whose first run builds DeepSpeed's C++ ops)
# A section that fails or times out prints FAILED and its one-line reason in its rows; the others still run
# (exit status 1 then). Logs: $OUT (or the work dir)/<section>.log.
#
# Python: $PYTHON, else .venv/bin/python if present, else python3. The lent GPU machine has no network; its
# python3 holds CUDA torch + transformers only. Carry the wheels in .whl (installed into a temp dir when one
# of pydantic, peft is missing), as bench/gpu_pretrain.sh does, plus peft's and, for the qlora section,
# bitsandbytes (a ~60 MB manylinux wheel: with the others it may not fit a 64 MiB carry; without it the
# qlora row says "skipped: bitsandbytes not installed"):
#   echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 -d .whl pydantic==2.14.4 pydantic_core==2.50.5 \
#     annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 peft==0.21.2 accelerate psutil \
#     [bitsandbytes==0.50.2]
#   and for the deepspeed section, a pure-Python wheel built here (PyPI has only the sdist) plus its dependencies:
#     python3 -m pip wheel --no-deps -w .whl deepspeed==0.19.8; python3 -m pip download --no-deps --only-binary=:all: \
#       --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64 -d .whl hjson ninja py-cpuinfo \
#       einops msgpack nvidia-ml-py
#   then, there: PYTHON=python3 bash bench/gpu_check.sh     (device tool: carry [".whl"], timeout_s 580)
# Knobs (env): BUDGET_S (530) for the whole script; BENCH_TMP (scratch dir); STEPS (30) for the pretrain runs.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
DRY=0 ONLY=""
while (( $# )); do
  case $1 in
    --dry-run) DRY=1 ;;
    --section) ONLY=${2:?--section needs a name}; shift ;;
    *) echo "usage: bash bench/gpu_check.sh [--dry-run] [--section NAME]" >&2; exit 2 ;;
  esac
  shift
done
SECTIONS=(env pretrain fsdp model qlora serve eval deepspeed)
# Rows per section: key and label; the table lists them in this order.
declare -A ROWS_OF=([env]="env" [pretrain]="pretrain-124m pretrain-1b" [fsdp]="fsdp" [model]="model"
                    [qlora]="qlora" [serve]="serve-8 serve-32" [eval]="eval" [deepspeed]="deepspeed")
declare -A LABEL=([env]="environment" [pretrain-124m]="pretrain 124m (compile, flash SDPA, bf16)"
                  [pretrain-1b]="pretrain 1b (compile, flash SDPA, bf16)"
                  [fsdp]="FSDP checkpoint + resume (124m)" [model]="~1B test model (preset 1b, random init)"
                  [qlora]="QLoRA finetune of the ~1B model" [serve-8]="serving engine, 8 in flight"
                  [serve-32]="serving engine, 32 in flight" [eval]="eval perplexity, bf16"
                  [deepspeed]="DeepSpeed engine, ZeRO-3 (124m)")
# Per-section timeouts (s); each is also capped by the budget left.
if (( DRY )); then
  declare -A LIMIT=([env]=30 [pretrain]=150 [fsdp]=90 [model]=60 [qlora]=90 [serve]=60 [eval]=60 [deepspeed]=150)
  DEVICE=cpu PRESET_124M=tiny PRESET_1B=tiny SEQ=64 PRECISION=fp32 DTYPE=bfloat16
else
  declare -A LIMIT=([env]=30 [pretrain]=250 [fsdp]=70 [model]=60 [qlora]=90 [serve]=60 [eval]=30 [deepspeed]=80)
  DEVICE=cuda PRESET_124M=124m PRESET_1B=1b SEQ=2048 PRECISION=bf16 DTYPE=bfloat16
fi
export PY DRY DEVICE PRESET_124M PRESET_1B SEQ PRECISION DTYPE
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
if [[ -z ${GPU_CHECK_SITE:-} && -d .whl ]] && ! "$PY" -c "import pydantic, peft" 2>/dev/null; then
  export GPU_CHECK_SITE=/tmp/gpu-check-site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$GPU_CHECK_SITE" .whl/*.whl
  export PYTHONPATH="$GPU_CHECK_SITE:$PYTHONPATH"
fi
if [[ -z ${GPU_CHECK_WORK:-} ]]; then
  SCRATCH=/tmp
  (( ! DRY )) && (( $(df --output=avail -B1G /dev/shm 2>/dev/null | tail -n 1 || echo 0) >= 30 )) && SCRATCH=/dev/shm
  GPU_CHECK_WORK=${BENCH_TMP:-$(mktemp -d "$SCRATCH/lmforge-gpu-check.XXXXXX")}
fi
export GPU_CHECK_WORK GPU_CHECK_LOGS=${OUT:-$GPU_CHECK_WORK}
W=$GPU_CHECK_WORK
mkdir -p "$W/rows" "$GPU_CHECK_LOGS"

# ---------------------------------------------------------------- helpers (used inside sections)
row() {  # row KEY RESULT NOTES: one table row, written where the main process reads it
  printf '%s\t%s\n' "$2" "$3" >"$W/rows/$1"
}
train_summary() {  # train_summary RUN_DIR WARMUP: "tok/s<TAB>mfu or n/a<TAB>peak GB<TAB>final loss" from metrics.jsonl
  "$PY" - "$@" <<'PY'
import importlib.util, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("summarize_metrics", "bench/summarize_metrics.py")
sm = importlib.util.module_from_spec(spec); spec.loader.exec_module(sm)
r = sm.summarize_run(Path(sys.argv[1]), warmup=int(sys.argv[2]))
mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
print(f"{r['tokens_per_sec']:,.0f}\t{mfu}\t{r['peak_mem_gb']:.2f}\t{r['final_loss']:.4f}\t{r['steps']}")
PY
}
COMMON_LOG=(train.log_every=1 train.eval_every=0 log.progress=false log.tensorboard=false)

# ---------------------------------------------------------------- sections
section_env() {
  "$PY" - <<'PY' >"$W/env.txt"
import importlib, os, torch, transformers
missing = []
for name in ("pydantic", "peft", "bitsandbytes"):
    try:
        importlib.import_module(name)
    except Exception:
        missing.append(name)
if os.environ["DEVICE"] == "cuda":
    assert torch.cuda.is_available(), f"no CUDA device visible to torch {torch.__version__}"
    dev = f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"
else:
    dev = "cpu (dry run)"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, {dev}")
print("missing: " + ", ".join(missing) if missing else "peft, bitsandbytes present")
PY
  row env "$(sed -n 1p "$W/env.txt")" "$(sed -n 2p "$W/env.txt")"
}

section_pretrain() {  # bench/gpu_pretrain.sh does the runs (and, on CUDA, the flash SDPA preflight)
  local dry=() left=$1
  (( DRY )) && dry=(--dry-run)
  BENCH_TMP="$W/pretrain" OUT="$GPU_CHECK_LOGS/pretrain" BUDGET_S=$(( left - 5 )) STEPS=${STEPS:-30} \
    TIMEOUT_124M=$(( (left - 5) * 2 / 5 )) TIMEOUT_1B=$(( (left - 5) * 3 / 5 )) \
    bash bench/gpu_pretrain.sh "${dry[@]}" 2>&1 | tee "$W/pretrain.out"
  local rc=${PIPESTATUS[0]} name s flash="flash SDPA not checked (CPU)"
  (( DRY )) || flash=$(grep -m 1 -E '^(preflight: |WARNING: flash)' "$W/pretrain.out" | cut -c1-100)
  for name in 124m 1b; do
    if [[ -s $W/pretrain/$name/metrics.jsonl ]] && s=$(train_summary "$W/pretrain/$name" "$( (( DRY )) && echo 1 || echo 10)"); then
      IFS=$'\t' read -r tps mfu mem loss steps <<<"$s"
      row "pretrain-$name" "MFU $mfu, $tps tokens/s, peak $mem GB" \
          "preset $( (( DRY )) && echo tiny || echo "$name"), seq $SEQ, $steps steps, final loss $loss; ${flash:-no flash preflight line}"
    else
      row "pretrain-$name" "FAILED: $(grep -v '^\s*$' "$GPU_CHECK_LOGS/pretrain/$name.log" 2>/dev/null | tail -n 1 | cut -c1-160)" \
          "log $GPU_CHECK_LOGS/pretrain/$name.log"
    fi
  done
  return "$rc"
}

section_fsdp() {
  local k n=$(( DRY ? 4 : 10 )) mbs=$(( DRY ? 4 : 8 )) seq=$(( DRY ? 64 : 1024 ))
  "$PY" bench/make_synthetic_shards.py "$W/fsdp-data" --vocab-size "$( (( DRY )) && echo 512 || echo 32000)" \
    --n-tokens "$( (( DRY )) && echo 20000 || echo 2000000)" --n-val-tokens 16 || return 1
  local args=(data.dir="$W/fsdp-data" model.preset="$PRESET_124M" model.max_seq_len="$seq" train.device="$DEVICE"
              train.precision="$PRECISION" train.compile=false train.parallel=fsdp train.micro_batch_size="$mbs"
              train.max_steps=$(( 2 * n )) train.warmup_steps=2 train.ckpt_every="$n" train.async_checkpoint=true
              "${COMMON_LOG[@]}")
  local launch=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m lmforge pretrain)
  "${launch[@]}" out_dir="$W/fsdp-full" "${args[@]}" resume=never || return 1
  local ckpt
  ckpt="$W/fsdp-full/checkpoints/$(printf 'step-%07d' "$n")"
  [[ -f $ckpt/dcp/.metadata ]] || { echo "no sharded checkpoint at $ckpt"; return 1; }
  "${launch[@]}" out_dir="$W/fsdp-resumed" "${args[@]}" resume="$ckpt" || return 1
  # bf16 on CUDA: kernels may pick other reduction orders after a restart; on CPU in fp32 the losses are equal.
  "$PY" - "$W/fsdp-full" "$W/fsdp-resumed" "$n" "$( (( DRY )) && echo 1e-6 || echo 2e-2)" <<'PY' >"$W/fsdp.txt" || return 1
import json, sys
from pathlib import Path
def losses(d):
    return {r["step"]: r for r in map(json.loads, (Path(d) / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
full, resumed, k, tol = losses(sys.argv[1]), losses(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
steps = list(range(k + 1, 2 * k + 1))
assert sorted(resumed) == steps, f"the resumed run logged steps {sorted(resumed)}, expected {k + 1}..{2 * k}"
delta = max(abs(full[s]["loss"] - resumed[s]["loss"]) for s in steps)
ok = "ok" if delta <= tol else f"FAILED: losses differ by more than {tol:g}"
print(f"{ok}: resumed at step {k}, max loss difference over steps {k + 1}-{2 * k} = {delta:.1e}, "
      f"loss {full[k + 1]['loss']:.3f} -> {full[2 * k]['loss']:.3f}")
PY
  row fsdp "$(cat "$W/fsdp.txt")" "world size 1 (fully_shard is a no-op on one process); sharded DCP checkpoint written in the background (train.async_checkpoint), resumed, HF weights streamed from the shards at the end"
  [[ $(cat "$W/fsdp.txt") == ok* ]]
}

section_model() {
  "$PY" - "$W/model" "$PRESET_1B" "$( (( DRY )) && echo 512 || echo 2048)" "$DEVICE" <<'PY' >"$W/model.txt"
import string, sys, time, torch
from transformers import LlamaForCausalLM
from lmforge.model.config import ModelConfig
from lmforge.tokens.tokenizer import build_char_tokenizer
out, preset, seq, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
t0 = time.perf_counter()
build_char_tokenizer(string.printable, out)
cfg = ModelConfig(preset=preset, vocab_size=len(string.printable) + 1, max_seq_len=seq)
torch.manual_seed(0)
with torch.device(device):  # initialised where it runs: seconds on a GPU for 1B parameters
    hf_cfg = cfg.to_hf_config()
    hf_cfg.eos_token_id = len(string.printable)  # the character tokenizer's EOS id
    model = LlamaForCausalLM(hf_cfg)
model.to(torch.bfloat16).save_pretrained(out)
n = sum(p.numel() for p in model.parameters())
print(f"{n / 1e6:,.1f} M params, built and saved in {time.perf_counter() - t0:.0f} s")
PY
  [[ -s $W/model.txt ]] || return 1
  row model "$(cat "$W/model.txt")" "preset $PRESET_1B, bf16, vocab = string.printable + EOS (character tokenizer)"
}

need_model() {
  [[ -f $W/model/config.json ]] || { echo "the model section did not build $W/model"; return 1; }
}

section_qlora() {
  need_model || return 1
  local m
  for m in bitsandbytes peft; do
    if ! "$PY" -c "import $m" 2>/dev/null; then row qlora "skipped: $m not installed" "carry its wheel in .whl (see the header)"; return 0; fi
  done
  "$PY" - "$W/qlora.jsonl" <<'PY'
import json, random, sys
rng = random.Random(0)
words = "the quick brown fox jumps over a lazy dog while seven cats run far into the quiet night".split()
say = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
with open(sys.argv[1], "w") as f:
    for _ in range(400):
        f.write(json.dumps({"instruction": say(rng.randint(20, 60)), "input": "", "output": say(rng.randint(40, 90))}) + "\n")
PY
  local steps=$(( DRY ? 4 : 30 ))
  "$PY" -m lmforge finetune base_model="$W/model" method=qlora data.path="$W/qlora.jsonl" data.format=alpaca \
    data.max_length=$(( DRY ? 256 : 1024 )) data.val_size=8 out_dir="$W/qlora" resume=never \
    train.device="$DEVICE" train.max_steps="$steps" train.micro_batch_size=$(( DRY ? 2 : 16 )) \
    train.ckpt_every=0 lora.target_modules=all-linear "${COMMON_LOG[@]}" || return 1
  "$PY" - "$W/qlora/metrics.jsonl" "$( (( DRY )) && echo 1 || echo 5)" <<'PY' >"$W/qlora.txt" || return 1
import json, statistics, sys
lines = {r["step"]: r for r in map(json.loads, open(sys.argv[1])) if "loss" in r}
train = [lines[s] for s in sorted(lines)]
steady = [r for r in train if r["step"] > int(sys.argv[2])] or train[-1:]
print(f"{statistics.median(r['tokens_per_sec'] for r in steady):,.0f} tokens/s, "
      f"peak {max(r.get('mem_gb', 0.0) for r in train):.2f} GB\tNF4 base + LoRA on all linear layers, "
      f"{train[-1]['step']} steps, loss {train[0]['loss']:.3f} -> {train[-1]['loss']:.3f}")
PY
  IFS=$'\t' read -r res notes <"$W/qlora.txt"
  row qlora "$res" "$notes"
}

section_serve() {
  need_model || return 1
  "$PY" - "$W/model" "$DEVICE" "$DTYPE" "$( (( DRY )) && echo 8 || echo 128)" "$W/serve" <<'PY' || return 1
import random, string, sys, time, torch
from lmforge.infer import Engine, SamplingParams, load_for_inference, run_batch
model, device, dtype, max_tokens, out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
m = load_for_inference(model, device=device, dtype=dtype)
assert m.runner_supported, "the fused runner refused the model"
rng = random.Random(0)
prompts = [m.tokenizer.encode("".join(rng.choice(string.ascii_letters + " ") for _ in range(64))) for _ in range(64)]
for c in (8, 32):
    engine = Engine(m.model, m.tokenizer, m.eos_ids, max_batch=c, max_model_len=64 + max_tokens)
    engine.start()
    try:
        run_batch(engine, [(prompts[0], SamplingParams(max_tokens=4, temperature=0))] * 2)  # warm-up
        if m.device.type == "cuda":
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        t0 = time.perf_counter()
        done = run_batch(engine, [(prompts[i], params) for i in range(2 * c)])
        wall = time.perf_counter() - t0
    finally:
        engine.stop()
    tokens = sum(len(d.token_ids) for d in done)
    assert tokens == 2 * c * max_tokens, f"{tokens} tokens, expected {2 * c * max_tokens}"
    mem = f", peak {torch.cuda.max_memory_allocated() / 1e9:.2f} GB" if m.device.type == "cuda" else ""
    with open(f"{out}-{c}", "w") as f:
        f.write(f"{tokens / wall:,.0f} output tokens/s{mem}\t{2 * c} requests x {max_tokens} tokens "
                f"(64-token prompts, greedy, ignore_eos), {m.device.type} {str(m.dtype).removeprefix('torch.')}\n")
PY
  local c
  for c in 8 32; do
    IFS=$'\t' read -r res notes <"$W/serve-$c"
    row "serve-$c" "$res" "$notes"
  done
}

section_eval() {
  need_model || return 1
  "$PY" - "$W/eval.jsonl" "$( (( DRY )) && echo 8 || echo 100)" "$( (( DRY )) && echo 300 || echo 4000)" <<'PY'
import json, random, string, sys
rng = random.Random(1)
with open(sys.argv[1], "w") as f:
    for _ in range(int(sys.argv[2])):
        f.write(json.dumps({"text": "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(int(sys.argv[3])))}) + "\n")
PY
  local t0=$SECONDS
  "$PY" -m lmforge eval perplexity "$W/model" --data "$W/eval.jsonl" --device "$DEVICE" --dtype "$DTYPE" \
    --max-length $(( DRY ? 128 : 1024 )) --out "$W/eval.json" || return 1
  local took=$(( SECONDS - t0 ))
  "$PY" - "$W/eval.json" "$took" <<'PY' >"$W/eval.txt" || return 1
import json, sys
r = json.load(open(sys.argv[1]))
flat = {**r, **r.get("results", {})} if isinstance(r.get("results"), dict) else r
ppl = next(v for k, v in flat.items() if "token_perplexity" in k)
n = next((v for k, v in flat.items() if k in ("tokens", "n_tokens")), None)
rate = f", {n / max(float(sys.argv[2]), 1):,.0f} tokens/s with load" if isinstance(n, int) else ""
print(f"token ppl {ppl:.2f}{rate}\t{n if n is not None else '?'} tokens, {sys.argv[2]} s including the model load")
PY
  IFS=$'\t' read -r res notes <"$W/eval.txt"
  row eval "$res" "$notes (random weights: ppl ~ vocab size is expected)"
}

section_deepspeed() {
  if ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
    row deepspeed "skipped: deepspeed not installed" "carry its wheel in .whl (see the header)"; return 0
  fi
  [[ -d $W/fsdp-data ]] || "$PY" bench/make_synthetic_shards.py "$W/fsdp-data" --vocab-size "$( (( DRY )) && echo 512 || echo 32000)" \
    --n-tokens "$( (( DRY )) && echo 20000 || echo 2000000)" --n-val-tokens 16 || return 1
  local n=$(( DRY ? 3 : 10 )) bf16=$( (( DRY )) && echo false || echo true)
  printf '{"zero_optimization": {"stage": 3}, "bf16": {"enabled": %s}, "gradient_clipping": 1.0}\n' "$bf16" >"$W/ds.json"
  local args=(data.dir="$W/fsdp-data" model.preset="$PRESET_124M" model.max_seq_len=$(( DRY ? 64 : 1024 ))
              train.device="$DEVICE" train.compile=false train.micro_batch_size=$(( DRY ? 4 : 8 )) deepspeed="$W/ds.json"
              train.max_steps=$(( 2 * n )) train.warmup_steps=2 train.ckpt_every="$n" "${COMMON_LOG[@]}")
  local launch=(env LMFORGE_DEEPSPEED_ENGINE=1 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m lmforge pretrain)
  "${launch[@]}" out_dir="$W/ds-run" "${args[@]}" train.max_steps="$n" train.decay_steps=$(( 2 * n )) resume=never \
    | tee "$W/ds.out" || return 1
  grep -q "runs on DeepSpeed's engine" "$W/ds.out" || { echo "the ds_config did not run on DeepSpeed's engine"; return 1; }
  "${launch[@]}" out_dir="$W/ds-run" "${args[@]}" || return 1
  local final
  final="$W/ds-run/checkpoints/$(printf 'step-%07d' $(( 2 * n )))"
  [[ -f $final/model.safetensors && -d $final/deepspeed ]] || { echo "no DeepSpeed checkpoint with HF weights at $final"; return 1; }
  local s
  s=$(train_summary "$W/ds-run" "$( (( DRY )) && echo 1 || echo 3)") || return 1
  IFS=$'\t' read -r tps mfu mem loss steps <<<"$s"
  row deepspeed "$tps tokens/s, MFU $mfu, peak $mem GB" \
      "1 process, ZeRO-3, $( [[ $bf16 == true ]] && echo bf16 || echo fp32); stopped at step $n and resumed from DeepSpeed's checkpoint, $steps steps, final loss $loss; HF weights gathered at the end"
}

if [[ -n $ONLY ]]; then  # one section, in this process: the main run starts each section this way
  [[ " ${SECTIONS[*]} " == *" $ONLY "* ]] || { echo "unknown section $ONLY (one of ${SECTIONS[*]})" >&2; exit 2; }
  "section_$ONLY" "${SECTION_LIMIT:-${LIMIT[$ONLY]}}"
  exit
fi

# ---------------------------------------------------------------- main: each section under its own timeout
rm -f "$W"/rows/*  # a reused BENCH_TMP: rows of an earlier run must not stand in for this one's
DRY_FLAG=()
(( DRY )) && DRY_FLAG=(--dry-run)
START=$SECONDS BUDGET_S=${BUDGET_S:-$(( DRY ? 480 : 530 ))}
for sec in "${SECTIONS[@]}"; do
  left=$(( BUDGET_S - (SECONDS - START) - 5 ))
  limit=$(( LIMIT[$sec] < left ? LIMIT[$sec] : left ))
  log="$GPU_CHECK_LOGS/$sec.log"
  if (( limit < 10 )); then
    for key in ${ROWS_OF[$sec]}; do row "$key" "FAILED: skipped, ${left}s of the ${BUDGET_S}s budget left" ""; done
    continue
  fi
  echo "== $sec (timeout ${limit}s, log $log)"
  t0=$SECONDS
  SECTION_LIMIT=$limit timeout -k 10 "$limit" bash "$0" "${DRY_FLAG[@]}" --section "$sec" >"$log" 2>&1
  rc=$?
  took=$(( SECONDS - t0 ))
  if (( rc == 124 || rc == 137 )); then
    reason="timed out after ${took}s"
  else
    reason="$(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-160)"
  fi
  for key in ${ROWS_OF[$sec]}; do
    if [[ ! -s $W/rows/$key ]] || (( rc == 124 || rc == 137 )); then
      (( rc )) || reason="the section wrote no result for this row"
      [[ -s $W/rows/$key && $(cut -f1 "$W/rows/$key") == FAILED* ]] || row "$key" "FAILED: ${reason:-exit $rc}" "log $log"
    fi
  done
  (( rc )) && { echo "   FAILED (exit $rc) after ${took}s; last lines:"; tail -n 15 "$log" | sed 's/^/   /'; } \
           || echo "   done in ${took}s"
done

{
  echo "## lmforge GPU check $( (( DRY )) && echo '(dry run: CPU, tiny models)')"
  echo
  echo "| check | result | notes |"
  echo "| --- | --- | --- |"
  for sec in "${SECTIONS[@]}"; do
    for key in ${ROWS_OF[$sec]}; do
      IFS=$'\t' read -r res notes <"$W/rows/$key"
      echo "| ${LABEL[$key]} | ${res//|//} | ${notes//|//} |"
    done
  done
  echo
  echo "total $(( SECONDS - START ))s (budget ${BUDGET_S}s); work dir $W; logs $GPU_CHECK_LOGS"
} | tee "$GPU_CHECK_LOGS/gpu_check.md"
# The table is built in a pipeline (a subshell): read the verdict back from the rows.
cut -f1 "$W"/rows/* | grep -q '^FAILED' && exit 1
exit 0
