"""Train a byte-level BPE tokenizer, build a character tokenizer, load any HF tokenizer directory.

Every tokenizer is saved in HF format (`tokenizer.json` + `tokenizer_config.json`) so that
`transformers.AutoTokenizer.from_pretrained(dir)` loads it and later stages need nothing of ours.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from lmforge.data.readers import ReadReport, iter_texts
from lmforge.errors import UserError

EOS = "<|endoftext|>"


def _save_hf(tok: Tokenizer, out_dir: str | Path, eos_token: str) -> Path:
    """Wrap a `tokenizers.Tokenizer` as a transformers fast tokenizer and save it in HF format."""
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos_token, clean_up_tokenization_spaces=False)
    hf.save_pretrained(out_dir)
    return out_dir


def train_bpe(
    paths: str | Path | Iterable[str | Path],
    out_dir: str | Path,
    vocab_size: int = 8192,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = (EOS,),
    text_field: str = "text",
    report: ReadReport | None = None,
) -> Path:
    """Train a byte-level BPE tokenizer (GPT-2 style) on the documents in `paths`; save it to `out_dir`.

    The first special token is the EOS token. Byte-level means every input encodes: no unknown tokens.
    """
    if not special_tokens:
        raise UserError("special_tokens must name at least the EOS token, e.g. ('<|endoftext|>',)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_texts(paths, text_field, report), trainer=trainer)
    return _save_hf(tok, out_dir, eos_token=special_tokens[0])


def build_char_tokenizer(text: str, out_dir: str | Path) -> Path:
    """Save a character tokenizer whose ids are nanoGPT shakespeare_char's: index in sorted(set(text)).

    EOS (`<|endoftext|>`) gets id len(chars) so documents can be separated. Every character is one
    token, nothing is normalised, and decoding concatenates, so decode(encode(text)) == text.
    A character outside the vocabulary fails at encode time (see `encode_batch`), never silently.
    """
    chars = sorted(set(text))
    vocab = {c: i for i, c in enumerate(chars)}
    vocab[EOS] = len(chars)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")  # every char, newlines included
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
    return _save_hf(tok, out_dir, eos_token=EOS)


def load_tokenizer(spec: str | Path):
    """Load the HF tokenizer saved in directory `spec` (any `AutoTokenizer` directory)."""
    from transformers import AutoTokenizer

    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory not found: {spec} (expected an HF tokenizer directory with tokenizer.json)"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:  # transformers' word for a directory that holds no usable tokenizer
        detail = " ".join(str(e).split())
        raise UserError(f"tokenizer {spec}: not a loadable HF tokenizer directory ({detail[:300]})") from e
    if not tok.is_fast:  # shards are encoded by the Rust tokenizer, which only fast tokenizers have
        raise UserError(f"tokenizer {spec} is not a fast tokenizer; it needs a tokenizer.json")
    return tok


def eos_id(tok) -> int:
    """The EOS token id of an HF tokenizer; documents in token shards are separated by it."""
    if tok.eos_token_id is None:
        raise UserError(
            f"tokenizer {tok.name_or_path} has no EOS token; set eos_token in its tokenizer_config.json"
        )
    return tok.eos_token_id


def encode_batch(tok, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens, encoded in parallel by the Rust tokenizer.

    Parallelism follows the `tokenizers` library: all cores unless TOKENIZERS_PARALLELISM=false
    (RAYON_NUM_THREADS caps the threads). Characters a char tokenizer lacks raise a UserError that counts them.
    """
    try:
        return [e.ids for e in tok.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
    except Exception as e:
        if not isinstance(tok.backend_tokenizer.model, models.WordLevel):
            raise
        vocab = tok.get_vocab()
        unknown = Counter(c for t in texts for c in t if c not in vocab)
        if not unknown:
            raise
        shown = ", ".join(f"{c!r} x{n}" for c, n in unknown.most_common(10))
        raise UserError(
            f"{sum(unknown.values())} characters ({len(unknown)} distinct) are not in the vocabulary of "
            f"tokenizer {tok.name_or_path}: {shown}; rebuild it from text that contains them"
        ) from e
