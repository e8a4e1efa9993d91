"""Tokenizers and token shards: nanoGPT parity, HF loading, round trips, bad input counted."""

import gzip
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from conftest import require
from lmforge.errors import UserError
from lmforge.data.readers import ReadReport, iter_texts
from lmforge.tokens.shards import load_shard, read_meta, token_dtype, write_sharded, write_shards
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


def _corpus(d: Path, n_files: int = 5, n_chars: int = 40_000) -> Path:
    """Plain-text and JSONL inputs in one directory: single-document and many-document files."""
    from conftest import synthetic_text

    d.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        (d / f"book{i:02d}.txt").write_text(synthetic_text(n_chars, seed=i))
    lines = synthetic_text(n_chars, seed=99).splitlines()
    (d / "posts.jsonl").write_text("".join(json.dumps({"text": " ".join(lines[j:j + 5])}) + "\n"
                                           for j in range(0, len(lines), 5)))
    return d


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_sharded_tokenize_with_two_workers_equals_one_worker_byte_for_byte(tmp_path):
    from conftest import run_cli

    inputs = _corpus(tmp_path / "in")
    write_sharded(inputs, "char", tmp_path / "w1", workers=1)
    proc = run_cli("tokenize", str(inputs), "--tokenizer", "char", "--out", str(tmp_path / "w2"), "--workers", "2")
    assert "docs/s" in proc.stderr and "tokens/s" in proc.stderr, proc.stderr
    one, two = _tree(tmp_path / "w1"), _tree(tmp_path / "w2")
    assert len([k for k in one if k.endswith(".train.bin")]) == 6
    assert one.keys() == two.keys() and all(one[k] == two[k] for k in one), [k for k in one if one[k] != two.get(k)]

    meta = read_meta(tmp_path / "w1")
    assert Path(meta["tokenizer"]) == (tmp_path / "w1" / "tokenizer").resolve()  # stored relative, read absolute
    # Each file is split as write_shards splits it alone, with the same tokenizer.
    write_shards(inputs / "book00.txt", meta["tokenizer"], tmp_path / "alone")
    assert (tmp_path / "w1" / "shards" / "00000.train.bin").read_bytes() == (tmp_path / "alone" / "train.bin").read_bytes()
    # The corpus reads as one sequence: the shards concatenated in input order.
    train = load_shard(tmp_path / "w1", "train")
    flat = np.concatenate([np.fromfile(tmp_path / "w1" / s["train"], dtype="<u2") for s in meta["shards"]])
    assert len(train) == len(flat) == meta["n_tokens"]["train"]
    idx = np.random.default_rng(0).integers(0, len(flat), size=(50, 33))
    assert np.array_equal(train[idx], flat[idx])
    ends = np.cumsum([s["n_tokens"]["train"] for s in meta["shards"]])
    across = np.arange(ends[0] - 3, ends[0] + 3)  # a window across a shard boundary
    assert np.array_equal(train[across], flat[across])


def test_sharded_tokenize_resumes_after_sigkill_without_redoing_finished_files(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    inputs = _corpus(tmp_path / "in", n_files=12, n_chars=400_000)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "lmforge", "tokenize", str(inputs), "--tokenizer", "char", "--out", str(out),
            "--workers", "1"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "shards" / "00001.json").is_file():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted((out / "shards").glob("*.json"))
    assert 2 <= len(done) < 13, len(done)
    assert not (out / "meta.json").exists()
    mtimes = {p.name: p.stat().st_mtime_ns for p in done}

    rerun = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"13 input files, {len(done)} already done, {13 - len(done)} to do" in rerun.stderr
    assert {p.name: p.stat().st_mtime_ns for p in done} == mtimes  # finished files were not redone
    write_sharded(inputs, "char", tmp_path / "clean", workers=1)
    resumed, clean = _tree(out), _tree(tmp_path / "clean")
    assert resumed.keys() == clean.keys() and all(resumed[k] == clean[k] for k in clean)

    # A changed input invalidates its marker (and only its): that file alone is redone.
    os.utime(inputs / "book03.txt", ns=(time.time_ns(), time.time_ns()))
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "13 input files, 12 already done, 1 to do" in again.stderr, again.stderr


def test_an_index_that_does_not_match_its_shards_is_a_user_error(tmp_path):
    write_sharded(_corpus(tmp_path / "in", n_files=2, n_chars=5_000), "char", tmp_path / "out", workers=1)
    shard = tmp_path / "out" / "shards" / "00001.train.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(UserError, match=r"meta.json does not match its shards: .*00001.train.bin has \d+ bytes"):
        load_shard(tmp_path / "out", "train")
    shard.unlink()
    with pytest.raises(UserError, match=r"shard 1 .*00001.train.bin is missing"):
        read_meta(tmp_path / "out")
    with pytest.raises(UserError, match="workers must be >= 1"):
        write_sharded(tmp_path / "in", "char", tmp_path / "out", workers=0)
