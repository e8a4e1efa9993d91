"""Tokenizers and token shards: nanoGPT parity, HF loading, round trips, bad input counted."""

import gzip
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from conftest import require
from lmforge.data.readers import ReadReport, iter_texts
from lmforge.tokens.shards import load_shard, read_meta, token_dtype, write_shards
from lmforge.tokens.tokenizer import EOS, build_char_tokenizer, encode_batch, load_tokenizer, train_bpe

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\n  Speak, speak! Ça va?\t—fin\n" * 3


def nanogpt_char(data: str) -> tuple[dict, bytes, bytes]:
    """nanoGPT shakespeare_char/prepare.py, inline: stoi, train.bin bytes, val.bin bytes."""
    chars = sorted(list(set(data)))
    stoi = {ch: i for i, ch in enumerate(chars)}
    n = len(data)
    train_ids = [stoi[c] for c in data[: int(n * 0.9)]]
    val_ids = [stoi[c] for c in data[int(n * 0.9) :]]
    return stoi, np.array(train_ids, dtype=np.uint16).tobytes(), np.array(val_ids, dtype=np.uint16).tobytes()


def test_char_shards_equal_nanogpt_prepare(tmp_path):
    (tmp_path / "input.txt").write_text(TEXT)
    meta = write_shards(tmp_path / "input.txt", "char", tmp_path / "out")

    stoi, train_ref, val_ref = nanogpt_char(TEXT)
    assert (tmp_path / "out" / "train.bin").read_bytes() == train_ref
    assert (tmp_path / "out" / "val.bin").read_bytes() == val_ref
    assert meta["vocab_size"] == len(stoi) + 1 and meta["eos_id"] == len(stoi)
    assert meta["n_docs"] == {"train": 1, "val": 1} and meta["split_by"] == "tokens"

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(meta["tokenizer"])
    assert tok.eos_token == EOS and tok.eos_token_id == len(stoi)
    assert tok.encode(TEXT) == [stoi[c] for c in TEXT]
    assert tok.encode("\n") == [stoi["\n"]] and tok.encode(" ") == [stoi[" "]]
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.decode([stoi["A"], len(stoi), stoi["l"]]) == "A" + EOS + "l"


def test_a_directory_without_a_usable_tokenizer_is_a_user_error(tmp_path):
    """transformers' own OSError/ValueError becomes a UserError naming the directory (one line from the CLI)."""
    from lmforge.errors import UserError

    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    for name in ("empty", "broken"):
        with pytest.raises(UserError, match=rf"^tokenizer .*{name}: not a loadable HF tokenizer directory \("):
            load_tokenizer(tmp_path / name)


def test_char_tokenizer_rejects_unknown_characters(tmp_path):
    tok = load_tokenizer(build_char_tokenizer("abc\n", tmp_path / "tok"))
    assert encode_batch(tok, ["cab\n"]) == [[3, 1, 2, 0]]  # "\n" sorts first
    with pytest.raises(ValueError, match=r"3 characters \(2 distinct\).*'z' x2, 'Q' x1"):
        encode_batch(tok, ["azbz", "Q"])


# ../shared/data is this machine's material, not something `make test` installs: skipping without it is right.
@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="shared tinyshakespeare.txt absent")
def test_tinyshakespeare_char_sizes(tmp_path):
    meta = write_shards(SHAKESPEARE, "char", tmp_path)
    assert meta["eos_id"] == 65  # 65 characters, ids 0..64 as in nanoGPT; EOS is one past them
    assert meta["vocab_size"] == 66 and meta["dtype"] == "uint16"
    assert len(load_shard(tmp_path, "train")) == 1003854
    assert len(load_shard(tmp_path, "val")) == 111540


@pytest.fixture(scope="module")
def stdlib_corpus(tmp_path_factory) -> Path:
    """The json package's source files, one .txt document each."""
    src = Path(json.__file__).parent
    corpus = tmp_path_factory.mktemp("corpus")
    for f in sorted(src.glob("*.py")):
        (corpus / f"{f.stem}.txt").write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    return corpus


def test_bpe_trains_loads_and_separates_documents_with_eos(tmp_path, stdlib_corpus):
    tok_dir = train_bpe(stdlib_corpus, tmp_path / "tok", vocab_size=600)

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert tok.eos_token == EOS and tok.encode(EOS) == [tok.eos_token_id]
    assert 300 < len(tok) <= 600
    sample = "def f(x):\n    return x , 1 .  ünïcode  \n\n"
    assert tok.decode(tok.encode(sample)) == sample

    meta = write_shards(stdlib_corpus, tok_dir, tmp_path / "shards")
    docs = [p.read_text(encoding="utf-8") for p in sorted(stdlib_corpus.glob("*.txt"))]
    train, val = load_shard(tmp_path / "shards", "train"), load_shard(tmp_path / "shards", "val")
    assert meta["n_docs"] == {"train": len(docs) - 1, "val": 1}  # < 10 docs: the last one keeps val non-empty
    assert len(train) + len(val) < sum(map(len, docs)) / 2  # BPE compresses
    eos = meta["eos_id"]
    assert int((train == eos).sum() + (val == eos).sum()) == len(docs)
    assert train[-1] == eos and val[-1] == eos
    first_doc = train[: int(np.argmax(train == eos))]
    assert tok.decode(first_doc.tolist()) == docs[0]
    assert tok.decode(val[:-1].tolist()) == docs[-1]


def test_bad_records_are_counted_and_the_rest_tokenized(tmp_path):
    lines = [
        json.dumps({"text": "alpha one"}),
        "{not json",
        json.dumps({"id": 3}),
        json.dumps({"text": ["a", "list"]}),
        "",
        json.dumps({"text": "beta two"}),
        json.dumps({"text": ""}),
        json.dumps({"text": "gamma three"}),
    ]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    meta = write_shards(path, "char", tmp_path / "out")

    assert meta["skipped"] == {"invalid_json": 1, "missing_text": 1, "non_string_text": 1, "empty_text": 1}
    assert meta["skipped_examples"][0] == f"{path}:2: invalid_json"
    assert meta["n_docs"] == {"train": 2, "val": 1}
    tok = load_tokenizer(meta["tokenizer"])
    decode = lambda split: tok.decode(load_shard(tmp_path / "out", split).tolist())  # noqa: E731
    assert decode("train") == f"alpha one{EOS}beta two{EOS}"
    assert decode("val") == f"gamma three{EOS}"


def test_documents_split_every_tenth_to_val(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": f"doc {i}"}) + "\n" for i in range(20)))
    meta = write_shards(path, "char", tmp_path / "out", text_field="body")
    tok = load_tokenizer(meta["tokenizer"])
    assert tok.decode(load_shard(tmp_path / "out", "val").tolist()) == f"doc 9{EOS}doc 19{EOS}"
    assert meta["n_docs"] == {"train": 18, "val": 2}


def test_iter_texts_reads_every_format(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("whole\nfile")
    (tmp_path / "d" / "b.md").write_text("# md")
    (tmp_path / "d" / "sub" / "c.json").write_text(json.dumps(["s1", {"text": "o2"}, 7]))
    with gzip.open(tmp_path / "d" / "sub" / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "gz"}) + "\n")
    (tmp_path / "d" / "notes.csv").write_text("x,y")
    report = ReadReport()
    assert list(iter_texts(tmp_path / "d", report=report)) == ["whole\nfile", "# md", "s1", "o2", "gz"]
    assert report.n_docs == 5
    assert report.skipped == {"not_an_object": 1, "unsupported_file": 1}
    with pytest.raises(ValueError, match=r"notes\.csv: unsupported file type"):
        iter_texts(tmp_path / "d" / "notes.csv")


def test_iter_texts_reads_parquet(tmp_path):
    pa = require("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["p0", None, "p2"]}), tmp_path / "t.parquet")
    report = ReadReport()
    assert list(iter_texts(tmp_path / "t.parquet", text_field="content", report=report)) == ["p0", "p2"]
    assert report.examples == [f"{tmp_path / 't.parquet'}:row 1: missing_text"]
    report = ReadReport()
    assert list(iter_texts(tmp_path / "t.parquet", report=report)) == []  # no 'text' column: counted, not fatal
    assert report.skipped == {"missing_text_column": 1} and "columns: content" in report.examples[0]


def test_missing_inputs_fail_clearly(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="input not found: .*nope.jsonl"):
        iter_texts([tmp_path, missing])  # fails at the call, before any document is read
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        write_shards(missing, "char", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
        load_tokenizer(tmp_path / "no_tok")


def test_meta_round_trip_and_validation(tmp_path):
    (tmp_path / "in.txt").write_text(TEXT)
    meta = write_shards(tmp_path / "in.txt", "char", tmp_path / "out")
    assert read_meta(tmp_path / "out") == meta
    train = load_shard(tmp_path / "out", "train")
    assert isinstance(train, np.memmap) and train.dtype == np.dtype("<u2")
    assert len(train) == meta["n_tokens"]["train"]

    del meta["eos_id"]
    (tmp_path / "out" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"meta\.json: missing key 'eos_id'"):
        read_meta(tmp_path / "out")


class _Trap:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_nanogpt_shards_without_meta_json(tmp_path):
    ids = np.array([3, 1, 4, 1, 5, 9, 2, 6], dtype=np.uint16)
    ids.tofile(tmp_path / "train.bin")
    sentinel = tmp_path / "unpickled"
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(_Trap(sentinel)))

    with pytest.raises(ValueError, match=r"without meta\.json .*meta\.pkl is not read.*model\.vocab_size"):
        read_meta(tmp_path)
    meta = read_meta(tmp_path, vocab_size=65)
    assert meta["vocab_size"] == 65 and meta["n_tokens"] == {"train": 8} and meta["dtype"] == "uint16"
    assert load_shard(tmp_path, "train", vocab_size=65).tolist() == ids.tolist()
    assert not sentinel.exists()
    with pytest.raises(FileNotFoundError, match="no meta.json and no train.bin"):
        read_meta(tmp_path / "empty_dir")


def test_dtype_follows_vocab_size(tmp_path):
    assert token_dtype(50257) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32

    # A char vocabulary of 66,000 characters: ids above 65535 must survive the shard round trip.
    chars = [chr(c) for c in range(0x100, 0x100 + 70000) if not 0xD800 <= c <= 0xDFFF][:66000]
    doc = "".join(reversed(chars[-10:])) + chars[0]
    (tmp_path / "vocab.txt").write_text("".join(chars), encoding="utf-8")
    (tmp_path / "doc.txt").write_text(doc, encoding="utf-8")
    tok_dir = build_char_tokenizer("".join(chars), tmp_path / "tok")
    meta = write_shards([tmp_path / "vocab.txt", tmp_path / "doc.txt"], tok_dir, tmp_path / "out")
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 66001
    val = load_shard(tmp_path / "out", "val")
    assert val.dtype == np.dtype("<u4")
    assert val.tolist() == list(range(65999, 65989, -1)) + [0, 66000]


def test_val_fraction_is_checked(tmp_path):
    (tmp_path / "in.txt").write_text(TEXT)
    with pytest.raises(ValueError, match="val_fraction"):
        write_shards(tmp_path / "in.txt", "char", tmp_path / "out", val_fraction=1.0)
    assert not (tmp_path / "out").exists()
