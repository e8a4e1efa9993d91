"""Random uint16 token shards in lmforge's format (train.bin, val.bin, meta.json), for throughput benchmarks."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def make_shards(out_dir: Path, vocab_size: int, n_tokens: int, n_val_tokens: int, seed: int = 0) -> dict:
    """Write uniform random token ids (EOS = vocab_size - 1, never drawn) and return the meta."""
    if vocab_size > 65535:
        raise ValueError(f"--vocab-size {vocab_size} does not fit uint16 (at most 65535)")
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_tokens), ("val", n_val_tokens)):
        rng.integers(0, vocab_size - 1, size=n, dtype=np.uint16).astype("<u2").tofile(out_dir / f"{split}.bin")
    meta = {"dtype": "uint16", "vocab_size": vocab_size, "eos_id": vocab_size - 1, "tokenizer": None,
            "n_tokens": {"train": n_tokens, "val": n_val_tokens}, "n_docs": {"train": 1, "val": 1}}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--n-tokens", type=int, default=4_000_000, help="train tokens")
    # A val shard no longer than one window makes the engine skip its end-of-run eval (and the
    # recompile that model.eval() triggers under torch.compile): the bench measures training only.
    p.add_argument("--n-val-tokens", type=int, default=None, help="val tokens (default n_tokens / 10)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    n_val = a.n_tokens // 10 if a.n_val_tokens is None else a.n_val_tokens
    meta = make_shards(a.out_dir, a.vocab_size, a.n_tokens, n_val, a.seed)
    print(f"wrote {a.out_dir}: {meta['n_tokens']['train']:,} train + {meta['n_tokens']['val']:,} val random tokens, "
          f"vocab {a.vocab_size}")


if __name__ == "__main__":
    main()
