"""`lmforge finetune`: full, LoRA or QLoRA supervised fine-tuning of any causal LM, on the pretraining engine.

The base comes from any source the model loader accepts (HF directory, hub id, GGUF, the
smollm2 alias, an lmforge run). Batches are padding-free: a micro-batch's examples share one
row, kept apart by position ids that restart per example (transformers turns those into a
document mask), and logits are computed only where there is a target — so no compute goes to
padding or to prompt positions that carry no loss.
"""
from __future__ import annotations

import json
import resource
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from lmforge.config import dump_config
from lmforge.errors import UserError
from lmforge.train.config import FinetuneConfig
from lmforge.train.deepspeed import deepspeed_plan
from lmforge.train.distributed import init_runtime, shutdown
from lmforge.device import resolve_precision
from lmforge.train.loop import Job, RunSpec, train
from lmforge.train.sft_data import batch_tokens, eval_batches, load_sft_data, train_batches

IGNORE = -100


def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over target positions only; logits are computed only there.

    No attention mask is passed: position ids restarting at 0 mark the examples sharing a row,
    and transformers builds the block-diagonal (document) mask from them.
    """
    device = next(p for p in model.parameters()).device
    x, y, pos = (batch[k].to(device, non_blocking=True) for k in ("input_ids", "targets", "position_ids"))
    keep = (y != IGNORE).any(0).nonzero().squeeze(1)  # positions with a target in any row
    out = model(input_ids=x, position_ids=pos, logits_to_keep=keep, use_cache=False)
    y = y[:, keep]
    loss = F.cross_entropy(out.logits.flatten(0, 1).float(), y.reshape(-1), ignore_index=IGNORE)
    return loss, int((y != IGNORE).sum())


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of an HF causal LM (FSDP wrapping units), found by the layer count."""
    n = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return list(module)
    return []


def trainable_summary(model: nn.Module) -> tuple[int, int, str]:
    """(trainable, total, PEFT's `print_trainable_parameters` line) — 4-bit weights counted unpacked."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * 2 if p.__class__.__name__ == "Params4bit" else p.numel()  # two 4-bit values per byte
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total, (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                              f"trainable%: {100 * trainable / max(total, 1):.4f}")


def build_model(cfg: FinetuneConfig, precision: str, device: torch.device, head: str = "lm") -> nn.Module:
    """The base loaded for `cfg.method`: full (fp32 master weights), LoRA (frozen base in the compute dtype), QLoRA.

    head="score" loads a one-score sequence classifier (a reward model) instead of a causal LM.
    """
    from lmforge.model.load import load_model

    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    if cfg.method == "full":
        return load_model(cfg.base_model, dtype=torch.float32, device=device, head=head)

    from peft import LoraConfig, get_peft_model
    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig
        q = cfg.qlora
        qdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(q.compute_dtype, compute)
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                                 bnb_4bit_use_double_quant=q.double_quant, bnb_4bit_compute_dtype=qdtype)
        base = load_model(cfg.base_model, dtype=qdtype, device=device, quantization_config=bnb, head=head)
        for m in base.modules():
            # bitsandbytes 0.50 repacks 4-bit weights for its AVX512-BF16 CPU inference kernel on the first
            # eval-mode no-grad forward (our step-0 eval); afterwards no gradient reaches the adapters.
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=cfg.train.grad_checkpointing,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        # The frozen base never gets an optimizer update, so it is stored in the compute dtype: half the
        # memory and no per-step casts under autocast. The adapters stay fp32.
        base = load_model(cfg.base_model, dtype=compute, device=device, head=head)
    lora = cfg.lora
    targets = lora.target_modules if lora.target_modules == "all-linear" else list(lora.target_modules)
    peft_cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                          bias="none", task_type="SEQ_CLS" if head == "score" else "CAUSAL_LM",
                          use_rslora=lora.rslora)
    model = get_peft_model(base, peft_cfg)
    model.peft_config["default"].base_model_name_or_path = portable_spec(cfg.base_model)
    return model


def portable_spec(spec: str) -> str:
    """An existing local path made absolute (so an adapter finds its base from anywhere); aliases and hub ids as is."""
    p = Path(spec)
    return str(p.resolve()) if p.exists() else spec


def apply_liger(model: nn.Module) -> None:
    """Liger's Triton kernels (RMSNorm, RoPE, SwiGLU) patched into the model; CUDA only."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        raise UserError("train.liger=true needs liger-kernel: pip install liger-kernel") from None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _apply_liger_kernel_to_instance(model=base, fused_linear_cross_entropy=False, cross_entropy=False)


def model_writers(cfg: FinetuneConfig, model: nn.Module, tokenizer):
    """(save_model, load_model) for the engine: a PEFT adapter directory, or a full HF model directory."""
    if cfg.method == "full":
        tied = getattr(model, "_tied_weights_keys", None) or {}
        tied = tied if isinstance(tied, dict) else {}

        def save(d: Path, sd: Mapping) -> None:
            model.save_pretrained(d, state_dict=dict(sd), max_shard_size="1000GB")
            if getattr(model, "generation_config", None) is not None:  # a reward model has none
                model.generation_config.save_pretrained(d)
            tokenizer.save_pretrained(d)

        def load(d: Path) -> dict:
            sd = load_file(str(d / "model.safetensors"))
            for dst, src in tied.items():
                if dst not in sd and src in sd:
                    sd[dst] = sd[src]
            return sd

        return save, load

    # Names in the adapter file, as PEFT writes them (`...lora_A.weight`, a SEQ_CLS head's `score.weight`), back
    # to the model's own (`...lora_A.default.weight`, `score.modules_to_save.default.weight`): PEFT's renaming is
    # run on placeholders and each is found again by identity.
    from peft import get_peft_model_state_dict
    placeholders = {n: torch.empty(0) for n, p in model.named_parameters() if p.requires_grad}
    by_id = {id(t): n for n, t in placeholders.items()}
    renamed = get_peft_model_state_dict(model, state_dict=placeholders, save_embedding_layers=False)
    to_model = {k: by_id[id(t)] for k, t in renamed.items() if id(t) in by_id}

    def save_adapter(d: Path, sd: Mapping) -> None:
        # Embeddings never train here; "auto" would look the base up on the hub to check for a resize.
        model.save_pretrained(d, state_dict=dict(sd), save_embedding_layers=False)
        tokenizer.save_pretrained(d)

    def load_adapter(d: Path) -> dict:
        weights = load_file(str(d / "adapter_model.safetensors"))
        missing = sorted(set(to_model) - set(weights))
        if missing:
            raise RuntimeError(f"{d} does not match this LoRA config: {len(missing)} adapter weights missing "
                               f"(first: {missing[0]})")
        return {to_model[k]: v for k, v in weights.items() if k in to_model}

    return save_adapter, load_adapter


def peak_rss_gb() -> float:
    """This process's peak resident memory (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 ** 3 if sys.platform == "darwin" else 1024 ** 2)


def finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune per `cfg`; resumes from out_dir/checkpoints/latest when it exists (resume=auto)."""
    from lmforge.model.load import load_tokenizer

    tc = cfg.train
    rt = init_runtime(tc.device, tc.parallel, tc.threads)
    try:
        # LoRA and QLoRA keep to FSDP2: their checkpoints are adapters, which DeepSpeed's engine does not write.
        ds_engine = None  # the ds_config when DeepSpeed's engine runs it
        if cfg.deepspeed is not None:
            not_here = None if cfg.method == "full" else f"{cfg.method} adapters train on lmforge's engine"
            ds_engine, notice = deepspeed_plan(cfg.deepspeed, rt.world_size, rt.device.type, not_here)
            if rt.is_main:
                print(notice, flush=True)
        if tc.liger and rt.device.type != "cuda":
            raise UserError("train.liger=true needs a CUDA device (Liger kernels are Triton)")
        precision = resolve_precision(tc.precision, rt.device)
        tokenizer = load_tokenizer(cfg.base_model)
        data = load_sft_data(cfg.data, tokenizer, cfg.seed, cfg.curriculum.field if cfg.curriculum else None)
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        if rt.is_main:
            dump_config(cfg, cfg.out_dir / "config.yaml")
            (cfg.out_dir / "data_report.json").write_text(json.dumps(data.report.to_dict(), indent=2) + "\n")
            print(data.report.summary(), flush=True)

        torch.manual_seed(cfg.seed)  # LoRA initialisation is the same on every rank and every run
        model = build_model(cfg, precision, rt.device)
        if tc.liger:
            apply_liger(model)
        trainable, total, line = trainable_summary(model)
        if rt.is_main:
            print(line, flush=True)
        save_model, load_model = model_writers(cfg, model, tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        batches = train_batches(data, cfg.seed, cfg.data.packing, cfg.data.max_length, pad_id)
        if cfg.curriculum is not None:
            from lmforge.train.curriculum import sft_curriculum
            batches = sft_curriculum(cfg.curriculum, data.train, tokenizer, cfg.base_model, cfg.seed, cfg.data.packing,
                                     cfg.data.max_length, pad_id, tc.max_steps, cfg.out_dir, rt)
        objective, metrics = sft_loss, None
        if cfg.ewc is not None:
            from lmforge.train.ewc import ewc_objective
            objective, metrics = ewc_objective(cfg.ewc, model, sft_loss, tokenizer, cfg.seed, tc.micro_batch_size,
                                               cfg.out_dir, precision, rt)
        job = Job(
            model=model, objective=objective, train_batches=batches, metrics=metrics,
            eval_batches=(lambda mbs, rank, world: eval_batches(data, mbs, rank, world)) if data.val else None,
            save_model=save_model, load_model=load_model, batch_tokens=batch_tokens,
            trainable_only=cfg.method != "full", blocks=decoder_layers(model),
        )
        spec = RunSpec(cfg.out_dir, cfg.resume, tc, cfg.guards, cfg.log, cfg.model_dump(mode="json"), ds_engine)
        summary = train(job, spec, rt)
        summary.update({"method": cfg.method, "trainable_params": trainable, "total_params": total,
                        "model_memory_gb": model.get_memory_footprint() / 1024 ** 3 if hasattr(model, "get_memory_footprint") else None,
                        "peak_rss_gb": peak_rss_gb(), "data": data.report.to_dict(), "rank": rt.rank})
        return summary
    finally:
        shutdown(rt)
