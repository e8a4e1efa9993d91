"""`lmforge pretrain`: a Llama-architecture model trained from scratch on token shards."""
from __future__ import annotations

from pathlib import Path

from lmforge.config import dump_config
from lmforge.device import resolve_precision
from lmforge.errors import UserError
from lmforge.model.build import build_model
from lmforge.model.config import flops_per_token, n_params
from lmforge.model.memory import ModelShape, auto_micro_batch
from lmforge.model.sharded import read_safetensors, write_model_dir
from lmforge.train.config import PretrainConfig
from lmforge.train.deepspeed import deepspeed_plan
from lmforge.train.data import MixtureSampler, PretrainData, SourceTokens, micro_batches
from lmforge.train.distributed import init_runtime, shutdown
from lmforge.train.loop import Job, RunSpec, train
from lmforge.train.objectives import causal_lm


def pretrain(cfg: PretrainConfig) -> dict:
    """Train per `cfg`; resumes from out_dir/checkpoints/latest when it exists (resume=auto)."""
    tc = cfg.train
    rt = init_runtime(tc.device, tc.parallel, tc.threads)
    try:
        ds_engine = None  # the ds_config when DeepSpeed's engine runs it
        if cfg.deepspeed is not None:
            ds_engine, notice = deepspeed_plan(cfg.deepspeed, rt.world_size, rt.device.type)
            if rt.is_main:
                print(notice, flush=True)
        data = PretrainData.open(cfg.data, cfg.model.vocab_size)
        meta = data.meta
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = int(meta["vocab_size"])
        elif cfg.model.vocab_size < int(meta["vocab_size"]):
            raise UserError(f"model.vocab_size {cfg.model.vocab_size} is smaller than the shards' "
                             f"vocab_size {meta['vocab_size']} ({data.names[0]}/meta.json)")
        seq_len = cfg.data.seq_len or cfg.model.max_seq_len
        if seq_len > cfg.model.max_seq_len:
            raise UserError(f"data.seq_len {seq_len} exceeds model.max_seq_len {cfg.model.max_seq_len}")
        if tc.auto_micro_batch:  # before the config is written, so config.yaml holds the sizes the run used
            tc.micro_batch_size, tc.grad_accum = auto_micro_batch(ModelShape.from_config(cfg.model), tc, seq_len,
                                                                  resolve_precision(tc.precision, rt.device),
                                                                  rt.device, rt.world_size)

        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        if rt.is_main:
            dump_config(cfg, cfg.out_dir / "config.yaml")
        global_batch = tc.micro_batch_size * tc.grad_accum * rt.world_size
        train_sampler = data.sampler("train", seq_len, global_batch, cfg.seed)
        if cfg.curriculum is not None:
            from lmforge.train.curriculum import window_curriculum
            train_sampler = window_curriculum(cfg.curriculum, data.train[0], seq_len, global_batch, cfg.seed,
                                              tc.max_steps, cfg.model.vocab_size, cfg.out_dir, rt)

        def eval_batches(micro_bs: int, rank: int, world: int):
            # A fixed set: batch i of every eval is the same windows (the sampler keyed by seed + 1, step i).
            sampler = data.sampler("val", seq_len, micro_bs, cfg.seed + 1)
            for i in range(rank, tc.eval_batches, world):
                yield sampler.batch(i, 0, micro_bs)

        built = build_model(cfg.model, cfg.seed)
        tok_dir = Path(meta["tokenizer"]) if meta.get("tokenizer") else None
        hf_config = cfg.model.hf_config_dict(meta.get("eos_id"))
        job = Job(
            model=built.module, objective=causal_lm,
            train_batches=lambda step, mbs, acc, rank, world: micro_batches(train_sampler, step, mbs, acc, rank, world),
            eval_batches=eval_batches if data.has_val(seq_len) else None,
            save_model=lambda d, sd: write_model_dir(d, built.export(sd), hf_config, tok_dir, meta.get("eos_id")),
            load_model=lambda d: built.import_weights(read_safetensors(d)),
            tokens_per_step=global_batch * seq_len, blocks=built.blocks,
            flops_per_token=flops_per_token(n_params(cfg.model), cfg.model.num_layers, cfg.model.hidden_size, seq_len,
                                            cfg.model.vocab_size),
            metrics=SourceTokens(train_sampler) if isinstance(train_sampler, MixtureSampler) else None,
        )
        spec = RunSpec(cfg.out_dir, cfg.resume, tc, cfg.guards, cfg.log, cfg.model_dump(mode="json"), ds_engine)
        summary = train(job, spec, rt)
        summary["n_params"] = n_params(cfg.model, include_embeddings=True)
        summary["tokens_per_step"] = job.tokens_per_step
        summary["rank"] = rt.rank
        if isinstance(train_sampler, MixtureSampler):
            summary["source_tokens"] = train_sampler.token_counts(summary["steps"])
        return summary
    finally:
        shutdown(rt)
