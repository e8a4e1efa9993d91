"""Export a Llama-architecture model as one GGUF file that llama.cpp runs, written with the `gguf` package.

It follows llama.cpp's own converter (convert_hf_to_gguf.py) for the Llama architecture: its tensor names,
Q/K rows permuted into llama.cpp's rotary layout, the hyperparameters it reads, norms and 1-D tensors kept
in F32, a tied output head left out (llama.cpp reuses token_embd), and the tokenizer embedded as a `gpt2`
BPE vocabulary (tokens, token types, merges, special token ids, add_bos, the chat template). Tensors are
streamed: the header is written from the safetensors headers, then each tensor is read, converted and
written in turn, so memory holds a few tensors, not the model. Sources that are not a plain HF directory
(adapters to merge, sharded checkpoints, hub ids) are first exported to a temporary HF directory.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from hashlib import sha256
from pathlib import Path

from lmforge.errors import UserError

# --dtype value -> (torch dtype for --format hf, GGML type for --format gguf); f32/f16/bf16 are llama.cpp's
# spellings (convert_hf_to_gguf --outtype), float32/float16/bfloat16 torch's: each pair names one type.
DTYPES = {"float32": ("float32", "F32"), "f32": ("float32", "F32"),
          "float16": ("float16", "F16"), "f16": ("float16", "F16"),
          "bfloat16": ("bfloat16", "BF16"), "bf16": ("bfloat16", "BF16"),
          "q8_0": (None, "Q8_0"), "q4_0": (None, "Q4_0")}
FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
              "Q4_0": "MOSTLY_Q4_0"}
ARCHITECTURES = ("LlamaForCausalLM",)

# llama.cpp names a BPE pre-tokenizer by the hash of the ids its check text encodes to (get_vocab_base_pre).
PRE_CHECK_TEXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis '
                  'concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 '
                  '?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? '
                  'I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? '
                  'We\'Ve a\'lL')
PRE_BY_HASH = {"855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
               "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
               "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2"}
# Otherwise by structure: GPT-2's byte-level regex alone is llama.cpp's "gpt-2" (what lmforge's BPE trainer
# writes); digits split one by one before it is "smollm" (the StarCoder/SmolLM family).
BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True}
DIGITS = {"type": "Digits", "individual_digits": True}


class GGUFExportError(UserError):
    """A model or output the GGUF export cannot write; the message is one line naming it."""


def hf_dtype(dtype: str | None) -> str | None:
    """The torch dtype name a --dtype value means for --format hf; GGUF-only block types are a one-line error."""
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise GGUFExportError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if DTYPES[dtype][0] is None:
        raise GGUFExportError(f"dtype {dtype} is a GGUF block quantization: pass --format gguf, or for an HF "
                              f"directory one of float32, bfloat16, float16")
    return DTYPES[dtype][0]


def write_gguf(model_dir: Path, out: Path, dtype: str | None, *, name: str, general_from: Path | None = None) -> dict:
    """Convert the HF directory `model_dir` into the GGUF file `out` (atomically); returns a summary."""
    import gguf
    import numpy as np

    config = _llama_config(model_dir)
    tensors = _plan_tensors(model_dir, config)
    ggml_type = (DTYPES[dtype][1] if dtype else
                 "BF16" if next(t["source_dtype"] for t in tensors if len(t["shape"]) == 2) == "BF16" else "F16")
    for t in tensors:
        t["type"] = _tensor_type(t, ggml_type, config.get("tie_word_embeddings", False))
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        for t in tensors:  # the header first, from shapes alone: tensors are converted one at a time below
            if t["type"] in ("F32", "F16"):
                np_dtype = np.dtype(np.float32 if t["type"] == "F32" else np.float16)
                writer.add_tensor_info(t["gguf_name"], t["shape"], np_dtype, math.prod(t["shape"]) * np_dtype.itemsize)
            else:
                qtype = gguf.GGMLQuantizationType[t["type"]]
                byte_shape = gguf.quant_shape_to_byte_shape(t["shape"], qtype)
                writer.add_tensor_info(t["gguf_name"], byte_shape, np.dtype(np.uint8), math.prod(byte_shape),
                                       raw_dtype=qtype)
        _add_metadata(writer, model_dir, config, ggml_type, name, general_from)
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            writer.write_tensor_data(_convert(t, config))
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    counts = Counter(t["type"].lower() for t in tensors)
    return {"dtype": ggml_type.lower(), "params": sum(math.prod(t["shape"]) for t in tensors),
            "tensors": dict(counts.most_common()), "bytes": out.stat().st_size}


def _llama_config(model_dir: Path) -> dict:
    """config.json of a Llama causal LM, checked for what GGUF export writes; raises GGUFExportError otherwise."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    archs = config.get("architectures") or ["LlamaForCausalLM"]
    if config.get("model_type") != "llama" or archs[0] not in ARCHITECTURES:
        raise GGUFExportError(f"{path}: GGUF export writes the Llama architecture ({', '.join(ARCHITECTURES)}); "
                              f"this model is {archs[0]} (model_type {config.get('model_type')!r})")
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "quantized")
        raise GGUFExportError(f"{path}: the weights are {method}-quantized; GGUF export needs full-precision "
                              f"weights (export the unquantized model, or merge the adapter onto one)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise GGUFExportError(f"{path}: rope type {rope.get('rope_type', rope.get('type'))!r} is not written by "
                              f"GGUF export yet (only the default rotary embedding)")
    return config


def _weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise GGUFExportError(f"{model_dir} has no *.safetensors weights; GGUF export reads safetensors")
    return files


def _plan_tensors(model_dir: Path, config: dict) -> list[dict]:
    """Each tensor to write, in the source's order: file, HF and GGUF names, shape, source dtype; from headers only."""
    import gguf
    from safetensors import safe_open

    n_layers = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    tied = config.get("tie_word_embeddings", False)
    plan = []
    for file in _weight_files(model_dir):
        with safe_open(file, "pt") as st:
            for key in st.keys():
                if key.endswith(".rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
                    continue  # recomputed by llama.cpp / the tied head is token_embd itself
                piece = st.get_slice(key)
                source_dtype = piece.get_dtype()
                if source_dtype not in ("F32", "F16", "BF16"):
                    raise GGUFExportError(f"{file}: tensor {key} is {source_dtype}; GGUF export needs float weights "
                                          f"(F32, F16 or BF16), not a quantized checkpoint")
                gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise GGUFExportError(f"{file}: tensor {key} has no llama.cpp name in the Llama architecture")
                plan.append({"file": file, "key": key, "gguf_name": gguf_name, "shape": tuple(piece.get_shape()),
                             "source_dtype": source_dtype})
    if not tied and not any(t["gguf_name"] == "output.weight" for t in plan):
        raise GGUFExportError(f"{model_dir}: no lm_head.weight and tie_word_embeddings is false")
    return plan


def _tensor_type(t: dict, ggml_type: str, tied: bool) -> str:
    """llama.cpp's choice: 1-D tensors and norms F32; a row not a whole number of blocks F16; under Q4_0 the
    output head (token_embd when tied) Q8_0, llama-quantize's own fallback for its Q6_K (gguf cannot write Q6_K)."""
    import gguf

    if len(t["shape"]) <= 1 or t["gguf_name"].endswith("_norm.weight"):
        return "F32"
    if ggml_type == "Q4_0" and t["gguf_name"] == ("token_embd.weight" if tied else "output.weight"):
        ggml_type = "Q8_0"
    block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]]
    return ggml_type if t["shape"][-1] % block == 0 else "F16"


def _permute_rope(w, n_head: int):
    """HF's q/k rows (two rotary halves per head) into llama.cpp's interleaved pairs (LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _convert(t: dict, config: dict):
    """One tensor read from its file, permuted where llama.cpp needs it, as the bytes of its GGUF type."""
    import gguf
    import torch
    from safetensors import safe_open

    with safe_open(t["file"], "pt") as st:
        w = st.get_tensor(t["key"]).to(torch.float32)
    if t["key"].endswith(("q_proj.weight", "q_proj.bias")):
        w = _permute_rope(w, config["num_attention_heads"])
    elif t["key"].endswith(("k_proj.weight", "k_proj.bias")):
        w = _permute_rope(w, config.get("num_key_value_heads") or config["num_attention_heads"])
    return gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[t["type"]])


def _add_metadata(writer, model_dir: Path, config: dict, ggml_type: str, name: str,
                  general_from: Path | None) -> None:
    """general.*, the llama.* hyperparameters and the tokenizer, as llama.cpp's converter writes them."""
    import gguf

    total = writer.get_total_parameter_count()
    writer.add_type(gguf.GGUFType.MODEL)
    _add_general(writer, model_dir, name, general_from, total)
    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    rope = config.get("rope_parameters") or {}
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    if head_dim != config["hidden_size"] // n_head:  # llama.cpp's default is hidden_size / heads
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[ggml_type]])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim)
    _add_tokenizer(writer, model_dir, config["vocab_size"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_general(writer, model_dir: Path, name: str, general_from: Path | None, total: tuple) -> None:
    """Name, size label and the like: a GGUF source's own general.* fields, else gguf.Metadata from the directory."""
    import gguf

    if general_from is not None:
        reader = gguf.GGUFReader(general_from)
        for key, field in reader.fields.items():
            if key.startswith("general.") and key not in ("general.architecture", "general.type",
                                                          "general.file_type", "general.quantization_version"):
                value = field.contents()
                writer.add_array(key, value) if isinstance(value, list) else writer.add_key_value(
                    key, value, field.types[0])
        return
    meta = gguf.Metadata.load(None, model_dir, name, total[0])
    if meta.size_label is None and total[0] > 0:
        meta.size_label = gguf.size_label(*total)
    meta.set_gguf_meta_model(writer)


def _add_tokenizer(writer, model_dir: Path, vocab_size: int) -> None:
    """The tokenizer as llama.cpp's `gpt2` BPE vocabulary (LlamaModel._set_vocab_gpt2), with its chat template."""
    import gguf
    from transformers import AutoTokenizer

    from lmforge.tokens.chat import CHATML_TEMPLATE

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise GGUFExportError(f"{model_dir} has no tokenizer.json; GGUF export embeds the tokenizer")
    spec = json.loads(path.read_text())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = model.get("type") if model.get("type") != "BPE" else "BPE with byte_fallback (SentencePiece-style)"
        raise GGUFExportError(f"{path}: the tokenizer is {kind}; GGUF export writes byte-level BPE tokenizers "
                              f"(llama.cpp's gpt2 vocabulary)")
    tok = AutoTokenizer.from_pretrained(model_dir)
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise GGUFExportError(f"{path}: token id {max(vocab.values())} is outside the model's vocab_size {vocab_size}")
    tokens, types = _vocab_tokens(tok, vocab, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tok, spec, path))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    pre = spec.get("pre_tokenizer") or {}
    byte_level = [p for p in pre.get("pretokenizers", [pre]) if p.get("type") == "ByteLevel"]
    writer.add_add_space_prefix(bool(byte_level and byte_level[0].get("add_prefix_space")))
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    special.add_special_token = _added_specials(tok)
    if special.chat_template is None:  # lmforge's chat and serve use ChatML for such a tokenizer: so does llama.cpp
        special.chat_template = tok.chat_template or CHATML_TEMPLATE
    if isinstance(special.chat_template, str):  # transformers' assistant-mask markers; other Jinja engines reject them
        special.chat_template = re.sub(r"{%-?\s*(end)?generation\s*-?%}", "", special.chat_template)
    special.add_to_gguf(writer, quiet=True)


def _vocab_tokens(tok, vocab: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their llama.cpp types (get_vocab_base): added special ones CONTROL, padding UNUSED."""
    import gguf

    by_id = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if token in added:
            if not decoder[i].normalized:  # llama.cpp expects added tokens pre-normalized
                token = tok.decode(tok.encode(token, add_special_tokens=False))
            special = decoder[i].special or (token.startswith("<|") and token.endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def _pre_tokenizer(tok, spec: dict, path: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: by its check-text hash, else by structure."""
    ids = tok.encode(PRE_CHECK_TEXT)
    found = PRE_BY_HASH.get(sha256(str(ids).encode()).hexdigest())
    if found:
        return found
    pre = spec.get("pre_tokenizer") or {}
    steps = [{k: p.get(k) for k in ("type", "use_regex", "individual_digits") if k in p}
             for p in pre.get("pretokenizers", [pre])]
    steps = [{**s, "use_regex": s.get("use_regex", True)} if s.get("type") == "ByteLevel" else s for s in steps]
    if steps == [BYTE_LEVEL]:
        return "gpt-2"
    if steps == [DIGITS, BYTE_LEVEL]:
        return "smollm"
    raise GGUFExportError(f"{path}: pre-tokenizer {json.dumps(pre)[:120]} has no llama.cpp equivalent known to "
                          f"GGUF export (byte-level GPT-2 regex, optionally after single-digit splitting)")


def _added_specials(tok) -> dict[str, bool]:
    """Whether encoding adds BOS (and EOS), read from what the tokenizer does, for add_bos/add_eos."""
    plain = tok.encode("a", add_special_tokens=False)
    full = tok.encode("a")
    adds = {"bos": tok.bos_token_id is not None and len(full) > len(plain) and full[0] == tok.bos_token_id}
    if tok.eos_token_id is not None and len(full) > len(plain) and full[-1] == tok.eos_token_id:
        adds["eos"] = True
    return adds
