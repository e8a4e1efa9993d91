"""The command tree. Thin: parse, load the config, call one stage function.

Heavy libraries (torch, transformers) are imported inside the commands that need them, so
`lmforge --help` and the data commands start fast.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
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


def _pipeline_config():
    from lmforge.data.pipeline import PipelineConfig
    return PipelineConfig


def _pretrain_config():
    from lmforge.train.config import PretrainConfig
    return PretrainConfig


def _finetune_config():
    from lmforge.train.config import FinetuneConfig
    return FinetuneConfig


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


def _train(args, config_cls, stage) -> int:
    """Load the config, run a training stage, print its summary (rank 0); a guard stop exits 1."""
    from lmforge.config import load_config

    path, overrides = _config_and_overrides(args)
    cfg = load_config(config_cls(), path, overrides)
    from lmforge.train.guards import TrainingStopped
    try:
        summary = stage()(cfg)
    except TrainingStopped as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 1
    if summary.get("rank", 0) == 0:
        _print_summary(summary, cfg.out_dir)
    return 0


def _pretrain_stage():
    from lmforge.train.pretrain import pretrain
    return pretrain


def _finetune_stage():
    from lmforge.train.finetune import finetune
    return finetune


def cmd_pretrain(args) -> int:
    return _train(args, _pretrain_config, _pretrain_stage)


def cmd_finetune(args) -> int:
    return _train(args, _finetune_config, _finetune_stage)


def _print_summary(s: dict, out_dir: Path) -> None:
    first, last = s.get("first_val"), s.get("last_val")
    if "n_params" in s:
        lines = [f"steps {s['steps']} in {s['elapsed_s']:.1f} s ({s['precision']}, {s['n_params'] / 1e6:.2f} M params)"]
    else:
        lines = [f"steps {s['steps']} in {s['elapsed_s']:.1f} s ({s['precision']}, {s['method']}, "
                 f"{s['trainable_params'] / 1e6:.2f} M of {s['total_params'] / 1e6:.1f} M params trained)"]
    if first:
        lines.append(f"val loss {first[0]:.4f} (ppl {first[1]:.2f}) at the start")
    if last:
        lines.append(f"val loss {last[0]:.4f} (ppl {last[1]:.2f}) at the end")
    if s.get("peak_rss_gb"):
        model_mem = f", model {s['model_memory_gb'] * 1024:,.1f} MB" if s.get("model_memory_gb") else ""
        lines.append(f"memory: peak RSS {s['peak_rss_gb']:.2f} GB{model_mem}")
    lines.append(f"metrics: {out_dir / 'metrics.jsonl'}")
    if s.get("final_checkpoint"):
        lines.append(f"checkpoint: {s['final_checkpoint']}")
    print("\n".join(lines))


def cmd_data_run(args) -> int:
    from lmforge.config import load_config
    from lmforge.data.pipeline import PipelineConfig, run_pipeline

    path, overrides = _config_and_overrides(args)
    cfg = load_config(PipelineConfig, path, overrides)
    report = run_pipeline(cfg)
    _print_data_report(report)
    print(f"report: {cfg.out_dir / 'report.json'}, {cfg.out_dir / 'report.png'}")
    return 0


def _print_data_report(report: dict) -> None:
    from lmforge.data.pipeline import funnel_table

    print(funnel_table(report))
    print(f"documents out: {report['docs_out']:,} in {len(report['outputs'])} file(s): "
          f"{report['outputs'][0] if report['outputs'] else '-'}{' ...' if len(report['outputs']) > 1 else ''}")
    if report["read"]["examples"]:
        print("skipped input (first): " + "; ".join(report["read"]["examples"][:5]))


def cmd_data_step(args) -> int:
    """`lmforge data filter|pii|extract|dedup IN OUT`: one step, in this process."""
    from lmforge.config import parse_override, set_dotted
    from lmforge.data.pipeline import build_step, run_single

    if args.command_name == "filter":
        if not args.filter:
            raise CliError("name at least one --filter (e.g. --filter gopher_quality)")
        opts: dict = {}
        for item in args.set or []:
            keys, value = parse_override(item)
            set_dotted(opts, keys, value)
        unknown = set(opts) - set(args.filter)
        if unknown:
            raise CliError(f"--set {sorted(unknown)[0]}.…: not one of the --filter names {args.filter}")
        specs = [{name: opts.get(name, {})} for name in args.filter]
    elif args.command_name == "pii":
        specs = [{"pii": {"kinds": args.kinds.split(",")} if args.kinds else {}}]
    elif args.command_name == "extract":
        specs = [{"extract": {"timeout_s": args.timeout}}]
    else:
        specs = [{"dedup": {"ngram": args.ngram, "bands": args.bands, "rows": args.rows,
                            "exact": not args.no_exact, "near": not args.no_near}}]
    for spec in specs:
        (name, opts), = spec.items()
        build_step(name, opts, check_only=True)
    report = run_single(specs, args.input, Path(args.output), args.text_field)
    _print_data_report(report)
    return 0


def cmd_data_crawl(args) -> int:
    from lmforge.data.crawl import DEFAULT_USER_AGENT, crawl

    allow = args.allow_net if args.allow_net else args.allow_private
    r = crawl(args.start_url, Path(args.out), max_pages=args.max_pages, max_depth=args.max_depth,
              delay_s=args.delay, concurrency=args.concurrency, allow_private=allow,
              allowed_domains=args.allowed_domain, max_bytes=args.max_bytes, max_redirects=args.max_redirects,
              timeout_s=args.timeout, user_agent=args.user_agent or DEFAULT_USER_AGENT,
              extract_timeout_s=args.extract_timeout, progress=not args.quiet).to_dict()
    skipped = {k: v for k, v in r["skipped"].items() if v}
    print(f"fetched {r['fetched']} pages ({r['bytes']:,} bytes) in {r['seconds']:.1f} s; {r['documents']} documents; "
          f"{r['frontier_left']} URLs left in the frontier")
    if skipped:
        print("skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(skipped.items(), key=lambda kv: -kv[1])))
    if skipped.get("ssrf") and not r["fetched"]:
        print("hint: the start URL resolves to a private or loopback address; pass --allow-private to crawl it")
    print(f"written: {Path(args.out) / 'crawl.warc.gz'}, {Path(args.out) / 'documents.jsonl'}, "
          f"{Path(args.out) / 'crawl_report.json'}")
    return 0


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
    from lmforge.generate import generate_samples

    prompt = args.prompt
    if args.template == "alpaca":
        from lmforge.train.sft_data import alpaca_template
        prompt = alpaca_template(prompt, args.input)
    samples = generate_samples(args.model, prompt=prompt, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                               num_samples=args.num_samples, seed=args.seed, device=args.device,
                               chat_template=args.template == "chat")
    for s in samples:
        print(s.text)
        print(f"--- {s.n_tokens} tokens, " + ("ended with EOS" if s.finished else "cut off at --max-new-tokens"))
    return 0


def cmd_chat(args) -> int:
    from lmforge.generate import chat

    chat(args.model, system=args.system, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
         top_p=args.top_p, seed=args.seed, device=args.device)
    return 0


def cmd_export(args) -> int:
    from lmforge.model.export import export_model

    info = export_model(args.model, args.out, merge_lora=args.merge_lora, dtype=args.dtype, overwrite=args.overwrite)
    merged = " (LoRA merged into the base)" if info["merged_lora"] else ""
    print(f"exported {info['source']}{merged}: {info['params'] / 1e6:.1f} M params, {info['dtype']} -> {info['out_dir']}")
    return 0


def cmd_serve(args) -> int:
    from lmforge.serve.server import load_serve_config, serve

    flags = {k: getattr(args, k) for k in ("model", "host", "port", "api_key", "served_model_name", "max_batch",
                                           "max_queue", "max_model_len", "max_prefill_tokens", "request_timeout",
                                           "max_body_bytes", "threads", "device", "dtype", "backend")}
    return serve(load_serve_config(args.config, flags))


def cmd_eval_tasks(args) -> int:
    from lmforge.eval import harness
    from lmforge.eval.tasks import TaskError

    specs = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not specs:
        raise CliError("--tasks: give at least one task name or task YAML")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise CliError(f"--num-fewshot must be 0 or more, got {args.num_fewshot}")
    if args.batch_tokens is not None and args.batch_tokens < 1:
        raise CliError(f"--batch-tokens must be at least 1, got {args.batch_tokens}")
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise CliError(f"--data-dir {args.data_dir}: no such directory")
    t0 = time.perf_counter()
    try:
        if args.bridge == "lm-eval":
            from lmforge.eval.bridge import evaluate_with_lm_eval

            results = evaluate_with_lm_eval(args.model, specs, limit=args.limit, num_fewshot=args.num_fewshot,
                                            device=args.device, max_length=args.max_length)
        else:
            from lmforge.eval.lm import EvalModel

            model = EvalModel.load(args.model, device=args.device, max_length=args.max_length,
                                   batch_tokens=args.batch_tokens)
            try:
                results = harness.evaluate(model, specs, limit=args.limit, num_fewshot=args.num_fewshot,
                                           data_dir=Path(args.data_dir) if args.data_dir else None)
            finally:
                model.close()
    except TaskError as e:
        raise CliError(str(e)) from None
    seconds = time.perf_counter() - t0
    print(harness.table(results))
    print(f"{args.model}: {len(results)} task(s) in {seconds:.1f} s")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "model": str(args.model), "results": results,
            "config": {"tasks": specs, "limit": args.limit, "num_fewshot": args.num_fewshot,
                       "bridge": args.bridge, "max_length": args.max_length}, "seconds": round(seconds, 2)},
            indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def cmd_eval_compare(args) -> int:
    from lmforge.eval import harness

    rows = harness.compare(harness.read_results(args.run_a), harness.read_results(args.run_b))
    if not rows:
        raise CliError(f"{args.run_a} and {args.run_b} share no task metric to compare")
    print(harness.compare_table(rows, args.run_a, args.run_b))
    return 0


def cmd_eval_perplexity(args) -> int:
    from dataclasses import asdict

    from lmforge.eval.lm import EvalModel
    from lmforge.eval.perplexity import read_documents, score

    docs = read_documents(args.data)
    if args.max_length is not None and args.max_length < 1:
        raise CliError(f"--max-length must be at least 1, got {args.max_length}")
    if args.batch_size is not None and args.batch_size < 1:
        raise CliError(f"--batch-size must be at least 1, got {args.batch_size}")
    model = EvalModel.load(args.model, device=args.device, max_length=args.max_length)
    if args.batch_size:
        model.batch_tokens = args.batch_size * model.max_length
    r = score(model, docs, args.stride)
    print(f"{r.documents} documents, {r.tokens:,} tokens, {r.words:,} words, {r.bytes:,} bytes "
          f"(max length {model.max_length}, stride {args.stride or model.max_length})")
    for key in ("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"):
        print(f"{key:<18} {getattr(r, key):.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": str(args.model), "data": str(args.data),
                                              "max_length": model.max_length, "stride": args.stride or model.max_length,
                                              **asdict(r)}, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def cmd_eval_human(args) -> int:
    from lmforge.eval.human.answers import Settings, ensure_answers, read_prompts
    from lmforge.eval.human.app import Session, serve
    from lmforge.eval.human.store import Store
    from lmforge.model.load import resolve

    if len(args.models) < 2:
        raise CliError(f"--models needs at least 2 models to compare, got {len(args.models)}")
    if len(set(args.models)) < len(args.models):
        raise CliError("--models names the same model twice")
    if args.max_new_tokens < 1:
        raise CliError("--max-new-tokens must be at least 1")
    prompts = read_prompts(args.prompts)
    for m in args.models:
        resolve(m)  # a missing path or unknown alias fails here, before any model is loaded
    out = Path(args.out)
    settings = Settings(args.max_new_tokens, args.temperature, args.seed, args.template)
    answers, generated, reused = ensure_answers(args.models, prompts, settings, out / "answers.jsonl", args.device)
    print(f"answers: {generated} generated, {reused} reused ({len(prompts)} prompts x {len(args.models)} models) "
          f"in {out / 'answers.jsonl'}")
    store = Store(out / "votes.sqlite", args.models)
    print(f"votes: {out / 'votes.sqlite'}")
    print(f"serving http://{args.host}:{args.port}/ (pairwise votes), /rate (1-5 ratings), /results (leaderboard, "
          f"CSV); Ctrl-C stops", flush=True)
    serve(Session(store, args.models, prompts, answers, seed=args.seed), args.host, args.port)
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

    ft = sub.add_parser("finetune", help="full, LoRA or QLoRA supervised fine-tuning of any causal LM",
                        description="Fine-tune a base model (HF dir, hub id, .gguf, lmforge run, or "
                                    "smollm2-135m-instruct) on instruction, chat or text data. " + CONFIG_HELP +
                                    " Prints the data report, trainable parameters and a summary; writes "
                                    "metrics.jsonl, data_report.json and checkpoints (PEFT adapters for "
                                    "lora/qlora) to out_dir. Re-running the same command resumes.",
                        config_help=_finetune_config)
    ft.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key.path=value ...]")
    ft.set_defaults(func=cmd_finetune)

    model_help = ("HF model dir, .gguf file, smollm2-135m-instruct, a PEFT adapter dir, a hub id, or a run's "
                  "out_dir (its latest checkpoint)")
    g = sub.add_parser("generate", help="sample text from any model, checkpoint, adapter or run",
                       description="Sample continuations; each is followed by its token count and whether it "
                                   "ended with EOS or hit --max-new-tokens.")
    g.add_argument("model", help=model_help)
    g.add_argument("prompt", nargs="?", default="", help="text to continue (default: start of a document)")
    g.add_argument("--template", choices=["none", "chat", "alpaca"], default="none",
                   help="wrap the prompt: chat = one user turn in the model's chat template; alpaca = the "
                        "### Instruction / ### Response template that finetune's alpaca format trains on")
    g.add_argument("--input", default="", help="with --template alpaca: the ### Input section")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    g.add_argument("--top-k", type=int, default=200)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive terminal chat with any model (applies its chat template)",
                       description="Chat in the terminal: /reset clears the history, /exit or Ctrl-D quits.")
    c.add_argument("model", help=model_help)
    c.add_argument("--system", default=None, help="system message")
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding")
    c.add_argument("--top-p", type=float, default=0.9)
    c.add_argument("--seed", type=int, default=1337)
    c.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    c.set_defaults(func=cmd_chat)

    e = sub.add_parser("export", help="write a clean HF model directory from any model source or run",
                       description="Export MODEL as a standalone HF directory (model.safetensors, config.json, "
                                   "tokenizer with chat template, generation_config.json). A LoRA run or adapter "
                                   "needs --merge-lora, which merges the adapter into its base.")
    e.add_argument("model", help=model_help)
    e.add_argument("--out", required=True, help="output directory (must be empty or new)")
    e.add_argument("--merge-lora", action="store_true", help="merge a LoRA adapter into its base model")
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="cast the weights (default: keep the source's dtype)")
    e.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    e.set_defaults(func=cmd_export)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and Prometheus metrics",
                       description="Serve MODEL (an alias, .gguf, HF directory, run or LoRA adapter) over the OpenAI "
                                   "API: /v1/completions, /v1/chat/completions, /v1/models, /tokenize, /detokenize, "
                                   "/generate, /health, /metrics. Flags override --config.")
    s.add_argument("model", nargs="?", help="model spec (or `model:` in --config)")
    s.add_argument("--config", help="YAML with the same settings as the flags (see configs/serve/)")
    s.add_argument("--host", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default 8000)")
    s.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1, /generate, /tokenize, /detokenize (repeatable)")
    s.add_argument("--served-model-name", action="append", default=[], metavar="NAME",
                   help="name(s) clients send as `model` (default: MODEL as given)")
    s.add_argument("--max-batch", type=int, help="sequences decoded together (default 32)")
    s.add_argument("--max-queue", type=int, help="requests that may wait; more get 429 (default 256)")
    s.add_argument("--max-model-len", type=int, help="context window: prompt + max_tokens (default: the model's)")
    s.add_argument("--max-prefill-tokens", type=int, help="prompt tokens prefilled per step (default 1024)")
    s.add_argument("--request-timeout", type=float, help="seconds before a request is abandoned with 408 (default 600)")
    s.add_argument("--max-body-bytes", type=int, help="request body cap; larger gets 413 (default 8 MiB)")
    s.add_argument("--threads", type=int, help="CPU threads for the model (default: all cores; give each replica "
                                               "its share when several run on one machine)")
    s.add_argument("--device", help="auto, cpu or cuda (default auto)")
    s.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (default: float32 on CPU, bfloat16 on CUDA)")
    s.add_argument("--backend", choices=["lmforge", "vllm"], help="vllm: run vLLM's server with these flags")
    s.set_defaults(func=cmd_serve)

    ev = sub.add_parser("eval", help="evaluate models").add_subparsers(dest="ecommand", required=True, metavar="SUB")
    et = ev.add_parser("tasks", help="benchmark tasks in lm-eval's YAML format (multiple choice, generate-until, code)",
                       description="Run lm-eval-format tasks (built-in names or task YAML files) on MODEL and print "
                                   "acc / acc_norm / exact_match / pass@1 with standard errors.")
    et.add_argument("model", help="model spec (alias, .gguf, HF directory, run, adapter)")
    et.add_argument("--tasks", required=True, help="comma-separated built-in names (hellaswag, arc_easy, "
                                                   "arc_challenge, mmlu, truthfulqa_mc1, gsm8k, humaneval) or task "
                                                   "YAML paths; with --bridge lm-eval, any lm-eval task")
    et.add_argument("--limit", type=float, help="first N documents per task (a fraction when below 1)")
    et.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: the task's, else 0)")
    et.add_argument("--data-dir", help="local data: DIR/<task>/<split>.jsonl replaces the task's hub dataset")
    et.add_argument("--max-length", type=int, help="context window in tokens (default: the model's positions)")
    et.add_argument("--batch-tokens", type=int, help="tokens per scoring forward pass (default 2,048 on CPU, 16,384 on "
                                                     "GPU)")
    et.add_argument("--device", default="auto", help="auto, cpu or cuda")
    et.add_argument("--bridge", choices=["lm-eval"], help="run the tasks with lm-eval-harness itself, on the model "
                                                         "lmforge loaded (needs the `eval` extra)")
    et.add_argument("--out", help="write the results to this JSON file")
    et.set_defaults(func=cmd_eval_tasks)
    ec = ev.add_parser("compare", help="per-metric deltas between two task runs, with their standard errors",
                       description="Compare two `eval tasks --out` files (or lm-eval results JSONs): B - A, "
                                   "the standard error of the difference and z.")
    ec.add_argument("run_a", help="results JSON (or a directory holding one)")
    ec.add_argument("run_b", help="results JSON (or a directory holding one)")
    ec.set_defaults(func=cmd_eval_compare)
    pp = ev.add_parser("perplexity", help="rolling-window perplexity as lm-eval's loglikelihood_rolling scores it",
                       description="Token, word and byte perplexity and bits per byte of MODEL on documents "
                                   "(lm-eval's definitions and windows).")
    pp.add_argument("model", help="model spec (alias, .gguf, HF directory, run, adapter)")
    pp.add_argument("--data", required=True, help=".txt (one document), .jsonl (`text` per line) or .json list")
    pp.add_argument("--max-length", type=int, help="tokens per window (default: the model's positions)")
    pp.add_argument("--stride", type=int, help="tokens each window predicts (default --max-length, as lm-eval)")
    pp.add_argument("--batch-size", type=int, help="windows per forward pass (default: 2,048 tokens' worth on CPU, "
                                                   "16,384 on GPU)")
    pp.add_argument("--device", default="auto", help="auto, cpu or cuda")
    pp.add_argument("--out", help="write the numbers to this JSON file")
    pp.set_defaults(func=cmd_eval_perplexity)
    hu = ev.add_parser("human", help="web page for pairwise votes and 1-5 ratings; Elo and Bradley-Terry leaderboard",
                       description="Generate each model's answer to every prompt once (cached in OUT/answers.jsonl), "
                                   "then serve a web page: / shows two anonymous answers to vote on, /rate one "
                                   "answer to rate 1-5, /results the leaderboard (online Elo, Bradley-Terry with "
                                   "bootstrap 95% intervals) and its CSV. Votes go to OUT/votes.sqlite.")
    hu.add_argument("--models", nargs="+", required=True, metavar="MODEL",
                    help="two or more model specs (alias, .gguf, HF directory, run, adapter)")
    hu.add_argument("--prompts", required=True, help=".jsonl (`prompt`, or `instruction` + `input`, per line), "
                                                     ".json list (e.g. Alpaca's) or .txt (one prompt per line)")
    hu.add_argument("--out", default="eval-human", help="directory for answers.jsonl and votes.sqlite "
                                                        "(default eval-human)")
    hu.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    hu.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    hu.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    hu.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    hu.add_argument("--template", choices=["chat", "alpaca", "none"], default="chat",
                    help="prompt format: chat = one user turn in the model's chat template (default); alpaca = "
                         "### Instruction / ### Response; none = the prompt as plain text")
    hu.add_argument("--seed", type=int, default=0, help="seeds sampling (with --temperature) and which pairs are shown")
    hu.add_argument("--device", default="auto", help="auto, cpu or cuda (for generating the answers)")
    hu.set_defaults(func=cmd_eval_human)

    d = sub.add_parser("data", help="data pipeline: crawl, extract, filter, dedup, PII, and whole runs")
    dsub = d.add_subparsers(dest="dcommand", required=True, metavar="SUB", parser_class=Parser)
    dr = dsub.add_parser("run", help="readers + an ordered list of steps over sharded inputs, resumable",
                         description="Run a data pipeline. " + CONFIG_HELP + " Prints a funnel; writes document "
                                     "shards, report.json and report.png to out_dir. Re-running resumes.",
                         config_help=_pipeline_config)
    dr.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key.path=value ...]")
    dr.set_defaults(func=cmd_data_run)
    for name, helptext in (("filter", "quality filters (heuristic, gopher_quality, gopher_repetition, c4, fineweb, "
                                      "language, perplexity)"),
                           ("pii", "replace emails, phones, SSNs, credit cards and public IPs"),
                           ("extract", "HTML documents -> main text (trafilatura)"),
                           ("dedup", "exact and MinHash-LSH near-duplicate removal")):
        sp = dsub.add_parser(name, help=helptext, description=f"{helptext}. IN and OUT are document JSONL(.gz) or "
                                                               "Parquet files.")
        sp.add_argument("input", metavar="IN")
        sp.add_argument("output", metavar="OUT")
        sp.add_argument("--text-field", default="text", help="JSON field holding the text (default text)")
        sp.set_defaults(func=cmd_data_step, command_name=name)
        if name == "filter":
            sp.add_argument("--filter", action="append", help="filter name; repeat for several, applied in order")
            sp.add_argument("--set", action="append", metavar="NAME.KEY=VALUE", help="a filter option")
        elif name == "pii":
            sp.add_argument("--kinds", help="comma-separated subset of email,phone,ssn,credit_card,ip (default all)")
        elif name == "extract":
            sp.add_argument("--timeout", type=float, default=10.0, help="seconds per document (default 10)")
        else:
            sp.add_argument("--ngram", type=int, default=5, help="word n-gram shingle size (default 5)")
            sp.add_argument("--bands", type=int, default=14, help="LSH bands (default 14)")
            sp.add_argument("--rows", type=int, default=8, help="rows per band (default 8)")
            sp.add_argument("--no-exact", action="store_true", help="skip exact-duplicate removal")
            sp.add_argument("--no-near", action="store_true", help="skip near-duplicate removal")
    dc = dsub.add_parser("crawl", help="polite crawler: robots.txt, per-host delay, SSRF guard, WARC + JSONL",
                         description="Crawl from START_URL within its host; writes a WARC file and documents as "
                                     "JSONL; a stopped crawl resumes from its saved frontier.")
    dc.add_argument("start_url")
    dc.add_argument("--out", required=True, help="output directory")
    dc.add_argument("--max-pages", type=int, default=100)
    dc.add_argument("--max-depth", type=int, default=3)
    dc.add_argument("--delay", type=float, default=1.0, help="seconds between requests to one host (default 1)")
    dc.add_argument("--concurrency", type=int, default=4)
    dc.add_argument("--allow-private", action="store_true",
                    help="allow private, loopback and link-local addresses (off by default: SSRF guard)")
    dc.add_argument("--allow-net", action="append", metavar="CIDR",
                    help="allow only these private networks (repeatable), e.g. 127.0.0.0/8")
    dc.add_argument("--allowed-domain", action="append", metavar="DOMAIN",
                    help="domains to stay in (repeatable; subdomains included); default the start URL's host")
    dc.add_argument("--max-bytes", type=int, default=5_000_000, help="largest page read (default 5 MB)")
    dc.add_argument("--max-redirects", type=int, default=5)
    dc.add_argument("--timeout", type=float, default=20.0, help="seconds per request (default 20)")
    dc.add_argument("--user-agent", help="default lmforge-crawler/VERSION")
    dc.add_argument("--extract-timeout", type=float, default=10.0, help="seconds of HTML extraction per page")
    dc.add_argument("--quiet", action="store_true", help="no per-page progress lines")
    dc.set_defaults(func=cmd_data_crawl)

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
