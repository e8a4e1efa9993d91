"""The command tree. Thin: parse, load the config, call one stage function.

Heavy libraries (torch, transformers) are imported inside the commands that need them, so
`lmforge --help` and the data commands start fast.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

CONFIG_HELP = ("CONFIG.yaml is optional; any key can be set or overridden as key.path=value "
               "(e.g. train.max_steps=100 data.dir=data/shakespeare). See README.md, 'Config reference'.")


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help can end with a config-key reference built only when asked for."""

    def __init__(self, *args, config_help=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.config_help = config_help

    def format_help(self) -> str:
        text = super().format_help()
        if self.config_help:
            from lmforge.config import config_reference
            text += "\nconfig keys (key.path  type = default  description):\n"
            text += "\n".join(config_reference(self.config_help())) + "\n"
        return text


def _pretrain_config():
    from lmforge.train.config import PretrainConfig
    return PretrainConfig


def _config_and_overrides(args) -> tuple[str | None, list[str]]:
    """The first positional may be a YAML file; everything of the form key=value is an override."""
    items = list(args.items)
    path = None
    if items and "=" not in items[0]:
        path = items.pop(0)
        if not path.endswith((".yaml", ".yml")):
            raise CliError(f"{path!r} is neither a .yaml config nor a key.path=value override")
    bad = [i for i in items if "=" not in i]
    if bad:
        raise CliError(f"{bad[0]!r} is not a key.path=value override")
    return path, items


def cmd_pretrain(args) -> int:
    from lmforge.config import load_config
    from lmforge.train.config import PretrainConfig

    path, overrides = _config_and_overrides(args)
    cfg = load_config(PretrainConfig, path, overrides)
    from lmforge.train.guards import TrainingStopped
    from lmforge.train.pretrain import pretrain
    try:
        summary = pretrain(cfg)
    except TrainingStopped as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 1
    if summary.get("rank", 0) == 0:
        _print_summary(summary, cfg.out_dir)
    return 0


def _print_summary(s: dict, out_dir: Path) -> None:
    first, last = s.get("first_val"), s.get("last_val")
    lines = [f"steps {s['steps']} in {s['elapsed_s']:.1f} s ({s['precision']}, {s['n_params'] / 1e6:.2f} M params)"]
    if first:
        lines.append(f"val loss {first[0]:.4f} (ppl {first[1]:.2f}) at the start")
    if last:
        lines.append(f"val loss {last[0]:.4f} (ppl {last[1]:.2f}) at the end")
    lines.append(f"metrics: {out_dir / 'metrics.jsonl'}")
    if s.get("final_checkpoint"):
        lines.append(f"checkpoint: {s['final_checkpoint']}")
    print("\n".join(lines))


def cmd_tokenizer_train(args) -> int:
    from lmforge.tokens.tokenizer import train_bpe

    out = train_bpe(args.inputs, args.out, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                    text_field=args.text_field)
    print(f"tokenizer written to {out}")
    return 0


def cmd_tokenize(args) -> int:
    from lmforge.tokens.shards import write_shards

    meta = write_shards(args.inputs, args.tokenizer, args.out, val_fraction=args.val_fraction,
                        text_field=args.text_field)
    n_tok, n_docs = meta["n_tokens"], meta.get("n_docs") or {}
    print(f"train: {n_tok['train']:,} tokens ({n_docs.get('train', '?')} docs); "
          f"val: {n_tok['val']:,} tokens ({n_docs.get('val', '?')} docs); vocab {meta['vocab_size']}; "
          f"written to {args.out}")
    if meta.get("skipped"):
        print(f"skipped: {json.dumps(meta['skipped'])}; first: {'; '.join(meta.get('skipped_examples', []))}")
    return 0


def cmd_generate(args) -> int:
    from lmforge.generate import generate

    for text in generate(args.model, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, num_samples=args.num_samples,
                         seed=args.seed, device=args.device):
        print(text)
        print("---")
    return 0


def cmd_info(args) -> int:
    import platform

    import torch

    info = {"lmforge": _version(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(),
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_bf16": bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())}
    for mod in ("transformers", "tokenizers", "safetensors", "tensorboard"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    width = max(map(len, info))
    for k, v in info.items():
        print(f"{k:<{width}}  {v}")
    return 0


def cmd_quickstart(args) -> int:
    from lmforge.quickstart import quickstart

    quickstart(out_dir=Path(args.out), data=args.data, minutes=args.minutes, seed=args.seed)
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("lmforge")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="lmforge", description="Train, fine-tune, align, evaluate and serve language models.")
    p.add_argument("--version", action="version", version=f"lmforge {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    q = sub.add_parser("quickstart", help="tokenizer + tokenize + pretrain + sample on an embedded corpus, in minutes",
                       description="Train a BPE tokenizer, tokenize, pretrain a small model on CPU for a few minutes, "
                                   "print val perplexity before and after and a sample. Default corpus: the Python "
                                   "standard library's own source files.")
    q.add_argument("--data", help="your own .txt/.jsonl file or directory instead of the embedded corpus")
    q.add_argument("--out", default="runs/quickstart", help="output directory (default runs/quickstart)")
    q.add_argument("--minutes", type=float, default=2.0, help="training time budget in minutes (default 2)")
    q.add_argument("--seed", type=int, default=1337)
    q.set_defaults(func=cmd_quickstart)

    t = sub.add_parser("tokenizer", help="tokenizer commands").add_subparsers(dest="tcommand", required=True, metavar="SUB",
                                                                          parser_class=Parser)
    tt = t.add_parser("train", help="train a byte-level BPE tokenizer (HF tokenizers) on documents",
                      description="Train a byte-level BPE tokenizer on .txt/.md/.jsonl/.json/.parquet files or "
                                  "directories; saved in HF format (tokenizer.json), loadable by AutoTokenizer.")
    tt.add_argument("inputs", nargs="+", help="files or directories of documents")
    tt.add_argument("--out", required=True, help="output tokenizer directory")
    tt.add_argument("--vocab-size", type=int, default=8192, help="target vocabulary size (default 8192)")
    tt.add_argument("--min-frequency", type=int, default=2, help="minimum pair frequency for a merge (default 2)")
    tt.add_argument("--text-field", default="text", help="JSON field holding the text (default text)")
    tt.set_defaults(func=cmd_tokenizer_train)

    k = sub.add_parser("tokenize", help="encode documents into train.bin / val.bin / meta.json token shards",
                       description="Encode documents with a tokenizer into flat uint16/uint32 token shards, "
                                   "documents separated by EOS. With --tokenizer char on one text file the split "
                                   "equals nanoGPT's shakespeare_char prepare.py.")
    k.add_argument("inputs", nargs="+", help="files or directories of documents")
    k.add_argument("--tokenizer", required=True, help="'char' or a HF tokenizer directory")
    k.add_argument("--out", required=True, help="output directory")
    k.add_argument("--val-fraction", type=float, default=0.1, help="fraction held out for validation (default 0.1)")
    k.add_argument("--text-field", default="text", help="JSON field holding the text (default text)")
    k.set_defaults(func=cmd_tokenize)

    pt = sub.add_parser("pretrain", help="pretrain a Llama-architecture model on token shards",
                        description="Pretrain from token shards. " + CONFIG_HELP +
                                    " Re-running the same command resumes from out_dir/checkpoints/latest. "
                                    "Multi-process: torchrun --nproc_per_node N -m lmforge pretrain ... "
                                    "train.parallel=ddp|fsdp.", config_help=_pretrain_config)
    pt.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key.path=value ...]")
    pt.set_defaults(func=cmd_pretrain)

    g = sub.add_parser("generate", help="sample text from a model directory, checkpoint or run directory")
    g.add_argument("model", help="HF model dir, a checkpoint dir, or a run's out_dir (uses its latest checkpoint)")
    g.add_argument("--prompt", default="", help="text to continue (default: start of document)")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    g.add_argument("--top-k", type=int, default=200)
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="versions, devices and threads")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lmforge.config import ConfigError
    try:
        return args.func(args)
    except (CliError, ConfigError, FileNotFoundError, ValueError) as e:
        if os.environ.get("LMFORGE_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
