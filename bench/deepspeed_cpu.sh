#!/usr/bin/env bash
# The same ds_config job on lmforge's FSDP2 engine and on DeepSpeed's engine, side by side on CPU.
#
#   bash bench/deepspeed_cpu.sh [RUNS]     # default 5 pairs, run in turn (A B A B ...) so drift hits both
#
# The job: 2 torchrun processes (gloo), preset tiny, seq 64, micro-batch 8, 40 steps, a ZeRO-3 fp32 ds_config,
# a checkpoint at step 20 and HF weights at the end. LMFORGE_DEEPSPEED_ENGINE=0 maps the ds_config onto FSDP2,
# =1 runs it on DeepSpeed's engine (its CPU accelerator). Prints per engine the median wall seconds of the
# whole process, the median in-loop tokens/s, and the last logged losses (they must agree).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
RUNS=${1:-5}
W=${BENCH_TMP:-$(mktemp -d /tmp/lmforge-ds-bench.XXXXXX)}
"$PY" bench/make_synthetic_shards.py "$W/data" --vocab-size 512 --n-tokens 200000 --n-val-tokens 16 >/dev/null
echo '{"zero_optimization": {"stage": 3}, "bf16": {"enabled": false}, "gradient_clipping": 1.0}' >"$W/z3.json"

run() {  # run ENGINE OUT: prints its start and end times (s)
  rm -rf "$2"
  local t0=$EPOCHREALTIME
  LMFORGE_DEEPSPEED_ENGINE=$1 OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 \
    -m lmforge pretrain data.dir="$W/data" out_dir="$2" model.preset=tiny model.max_seq_len=64 train.device=cpu \
    train.precision=fp32 train.max_steps=40 train.micro_batch_size=8 train.eval_every=0 train.ckpt_every=20 \
    train.log_every=10 deepspeed="$W/z3.json" log.progress=false log.tensorboard=false resume=never >"$2.log" 2>&1 \
    || { echo "engine $1 failed; see $2.log" >&2; exit 1; }
  echo "$t0 $EPOCHREALTIME"
}

: >"$W/walls"
for i in $(seq 1 "$RUNS"); do
  echo "fsdp2 $(run 0 "$W/fsdp2")" >>"$W/walls"
  echo "deepspeed $(run 1 "$W/deepspeed")" >>"$W/walls"
done
"$PY" - "$W" <<'PY'
import json, statistics, sys
from pathlib import Path
w = Path(sys.argv[1])
walls = {}
for line in (w / "walls").read_text().split("\n"):
    if line:
        name, start, end = line.split()
        walls.setdefault(name, []).append(float(end) - float(start))
print("| engine | wall s (median of %d) | in-loop tokens/s (median) | losses at steps 10-40 |" % len(walls["fsdp2"]))
print("| --- | --- | --- | --- |")
for name in ("fsdp2", "deepspeed"):
    rows = [json.loads(x) for x in (w / name / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    tps = statistics.median(r["tokens_per_sec"] for r in rows[1:])
    losses = ", ".join(f"{r['loss']:.4f}" for r in rows)
    print(f"| {name} | {statistics.median(walls[name]):.2f} | {tps:,.0f} | {losses} |")
ratio = statistics.median(a / b for a, b in zip(walls["fsdp2"], walls["deepspeed"]))
print(f"\nfsdp2 / deepspeed wall, median of pairs: {ratio:.3f}")
PY
