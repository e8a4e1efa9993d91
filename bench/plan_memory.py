"""`lmforge plan memory` against what training measures: estimate vs measured peak, one row per configuration.

The measured figure is the peak of live tensor memory over two steady training steps (after a first step has made
the optimizer states), tracked storage by storage with lmforge.plan.measure.LiveTensorMemory on CPU; the estimate
is lmforge.model.memory's formula for the same job on the same device (no CUDA context, no allocator slack). The
peer is what `accelerate estimate-memory` counts for the same job (weights, gradients and Adam states: 16 B per
trained parameter, 4 B per frozen one; no activations), computed here by its rule since it needs the hub.
The 70B rows and the 1b config are then planned with the CLI, timed in fresh interpreters.

Run: .venv/bin/python bench/plan_memory.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIMS = dict(vocab_size=2048, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2, intermediate_size=704)


def accelerate_rule(shape, method: str) -> float:
    """accelerate estimate-memory's training figure: Adam at 16 B/param on what trains, 4 B/param frozen."""
    from lmforge.model.memory import lora_params

    if method == "full":
        return 16 * shape.n_params
    trained = lora_params(shape, 8, ("q_proj", "k_proj", "v_proj", "o_proj"))
    return 16 * trained + 4 * shape.n_params


def pretrain_rows(seq: int, quick: bool) -> list[dict]:
    from lmforge.model.config import ModelConfig
    from lmforge.model.memory import ModelShape, TrainSetup, training_memory
    from lmforge.plan.measure import measure_pretrain, measure_pretrain_ranks
    from lmforge.train.config import TrainConfig

    rows = []
    cases = [("pretrain", "fp32", False, "none", 4, 1), ("pretrain", "bf16", False, "none", 4, 1),
             ("pretrain", "bf16", True, "none", 4, 1), ("pretrain", "bf16", False, "none", 2, 2),
             ("pretrain DDP x2", "bf16", False, "ddp", 2, 1), ("pretrain FSDP x2", "bf16", False, "fsdp", 2, 1),
             ("pretrain FSDP x2", "fp32", False, "fsdp", 2, 1)]
    for name, precision, recompute, parallel, micro, accum in cases[:3] if quick else cases:
        mc = ModelConfig(preset=None, max_seq_len=seq, tie_embeddings=parallel == "none", **DIMS)
        tc = TrainConfig(micro_batch_size=micro, grad_accum=accum, precision=precision, device="cpu",
                         threads=1 if parallel != "none" else None, grad_checkpointing=recompute, parallel=parallel)
        measured = measure_pretrain_ranks(mc, tc)[0] if parallel != "none" else measure_pretrain(mc, tc)
        setup = TrainSetup(micro_batch=micro, grad_accum=accum, seq_len=seq, precision=precision,
                           grad_checkpointing=recompute, attention="sdpa" if precision == "fp32" else "eager",
                           parallel=parallel, world_size=2 if parallel != "none" else 1, cuda=False)
        shape = ModelShape.from_config(mc)
        rows.append(_row(name, precision, recompute, micro, accum, seq, training_memory(shape, setup), measured,
                         accelerate_rule(shape, "full")))
    return rows


def finetune_rows(seq: int, quick: bool) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmforge.model.memory import ModelShape, TrainSetup, training_memory
    from lmforge.plan.measure import measure_finetune
    from lmforge.train.config import FinetuneConfig

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        hf = LlamaConfig(vocab_size=DIMS["vocab_size"], hidden_size=DIMS["hidden_size"],
                         intermediate_size=DIMS["intermediate_size"], num_hidden_layers=DIMS["num_layers"],
                         num_attention_heads=DIMS["num_heads"], num_key_value_heads=DIMS["num_kv_heads"],
                         max_position_embeddings=seq, tie_word_embeddings=True)
        LlamaForCausalLM(hf).save_pretrained(d / "model")
        (d / "data.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
        shape = ModelShape.from_hf(json.loads((d / "model" / "config.json").read_text()))
        cases = [("full", False), ("lora", False), ("qlora", False), ("lora", True), ("qlora", True)]
        for method, recompute in cases[:3] if quick else cases:
            cfg = FinetuneConfig(base_model=str(d / "model"), method=method, data={"path": str(d / "data.jsonl")},
                                 train={"micro_batch_size": 4, "precision": "bf16", "device": "cpu",
                                        "grad_checkpointing": recompute})
            measured = measure_finetune(cfg, seq)
            setup = TrainSetup(method=method, micro_batch=4, seq_len=seq, precision="bf16", impl="hf",
                               grad_checkpointing=recompute, cuda=False)
            rows.append(_row(f"finetune {method}", "bf16", recompute, 4, 1, seq, training_memory(shape, setup),
                             measured, accelerate_rule(shape, method)))
    return rows


def _row(name, precision, recompute, micro, accum, seq, estimate, measured, peer) -> dict:
    return {"job": name, "precision": precision, "recompute": recompute, "micro": micro, "accum": accum, "seq": seq,
            "estimate_mb": estimate.tensors / 1e6, "measured_mb": measured["peak"] / 1e6,
            "ratio": estimate.tensors / measured["peak"], "accelerate_mb": peer / 1e6,
            "accelerate_ratio": peer / measured["peak"]}


def cli_timings() -> list[tuple[str, float, str]]:
    """Wall time of each planner command in a fresh interpreter, and its verdict line."""
    commands = [["configs/pretrain/1b.yaml", "--device", "h100-80gb", "--gpus", "8"]]
    commands += [["--model", "70b", "--method", m, "--device", "h100-80gb", "train.micro_batch_size=1",
                  "train.grad_checkpointing=true"] for m in ("full", "lora", "qlora")]
    out = []
    for args in commands:
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "lmforge", "plan", "memory", *args], capture_output=True,
                             text=True, cwd=ROOT, check=True)
        verdict = next(line for line in res.stdout.splitlines() if line.startswith("h100-80gb:"))
        out.append((" ".join(args), time.perf_counter() - t, verdict))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="three pretrain and three fine-tune rows")
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    rows = pretrain_rows(args.seq, args.quick) + finetune_rows(args.seq, args.quick)
    print(f"## plan memory: estimate vs measured peak of live tensors (CPU, {platform.processor() or 'cpu'}, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')})\n")
    print("Model: 4 layers, hidden 256, 8 heads / 2 KV heads, SwiGLU 704, vocab 2048. Measured: "
          "`lmforge.plan.measure` (live tensor storages, steps 2-3). accelerate: its estimate-memory rule "
          "(16 B/param trained, 4 B frozen, no activations).\n")
    print("| job | precision | recompute | micro x accum x seq | estimate MB | measured MB | estimate/measured "
          "| accelerate MB | accelerate/measured |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['job']} | {r['precision']} | {'yes' if r['recompute'] else 'no'} | {r['micro']} x {r['accum']} "
              f"x {r['seq']} | {r['estimate_mb']:.2f} | {r['measured_mb']:.2f} | {r['ratio']:.3f} | "
              f"{r['accelerate_mb']:.2f} | {r['accelerate_ratio']:.3f} |")
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"\nworst estimate error: {100 * worst:.1f} % over {len(rows)} rows\n")
    print("| plan memory command (fresh interpreter) | wall s | verdict |")
    print("|---|---:|---|")
    for cmd, secs, verdict in cli_timings():
        print(f"| `{cmd}` | {secs:.2f} | {verdict} |")


if __name__ == "__main__":
    main()
