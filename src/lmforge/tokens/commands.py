"""`lmforge tokenizer train` and `lmforge tokenize`: BPE training and token shards."""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from lmforge.command import Command
from lmforge.config import Strict


class TokenizerTrainConfig(Strict):
    inputs: list[str] = Field(description="files or directories of documents (.txt/.md/.jsonl/.json/.parquet)")
    out: Path = Field(description="output tokenizer directory (HF format: tokenizer.json)")
    vocab_size: int = Field(8192, gt=0, description="target vocabulary size")
    min_frequency: int = Field(2, gt=0, description="minimum pair frequency for a merge")
    text_field: str = Field("text", description="JSON field holding the text")


class TokenizeConfig(Strict):
    inputs: list[str] = Field(description="files or directories of documents")
    tokenizer: str = Field(description="'char' or an HF tokenizer directory")
    out: Path = Field(description="output directory for train.bin, val.bin and meta.json")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="fraction held out for validation")
    text_field: str = Field("text", description="JSON field holding the text")
    workers: int = Field(0, ge=0, description="0: one process writes train.bin/val.bin; N >= 1: N processes, one "
                                              "shard pair per input file under out/shards plus the meta.json "
                                              "index, resumable per file (same bytes for any N)")


def run_tokenizer_train(cfg: TokenizerTrainConfig) -> int:
    from lmforge.tokens.tokenizer import train_bpe

    out = train_bpe(cfg.inputs, cfg.out, vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                    text_field=cfg.text_field)
    print(f"tokenizer written to {out}")
    return 0


def run_tokenize(cfg: TokenizeConfig) -> int:
    from lmforge.tokens.shards import write_sharded, write_shards

    if cfg.workers:
        meta = write_sharded(cfg.inputs, cfg.tokenizer, cfg.out, val_fraction=cfg.val_fraction,
                             text_field=cfg.text_field, workers=cfg.workers)
    else:
        meta = write_shards(cfg.inputs, cfg.tokenizer, cfg.out, val_fraction=cfg.val_fraction,
                            text_field=cfg.text_field)
    n_tok, n_docs = meta["n_tokens"], meta.get("n_docs") or {}
    shards = f"{len(meta['shards'])} shard pairs + index " if "shards" in meta else ""
    print(f"train: {n_tok['train']:,} tokens ({n_docs.get('train', '?')} docs); "
          f"val: {n_tok['val']:,} tokens ({n_docs.get('val', '?')} docs); vocab {meta['vocab_size']}; "
          f"{shards}written to {cfg.out}")
    if meta.get("skipped"):
        print(f"skipped: {json.dumps(meta['skipped'])}; first: {'; '.join(meta.get('skipped_examples', []))}")
    return 0


COMMANDS = [
    Command("tokenizer train", "train a byte-level BPE tokenizer (HF tokenizers) on documents",
            lambda: TokenizerTrainConfig, run_tokenizer_train, positionals=("inputs",),
            description="Train a byte-level BPE tokenizer on .txt/.md/.jsonl/.json/.parquet files or directories; "
                        "saved in HF format (tokenizer.json), loadable by AutoTokenizer."),
    Command("tokenize", "encode documents into train.bin / val.bin / meta.json token shards",
            lambda: TokenizeConfig, run_tokenize, positionals=("inputs",),
            description="Encode documents with a tokenizer into flat uint16/uint32 token shards, documents separated "
                        "by EOS. With --tokenizer char on one text file the split equals nanoGPT's shakespeare_char "
                        "prepare.py."),
]
