"""What `quickstart --full` builds from the installed Python alone: a documentation site, and question/answer,
preference and multiple-choice data made from the standard library's docstrings.

Everything here is plain files; the stages read them through their own commands.
"""
from __future__ import annotations

import ast
import hashlib
import importlib
import json
import pydoc
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from lmforge.tokens.tokenizer import EOS

# Modules whose pydoc pages make the crawled site: pure Python, documented, safe to import.
SITE_MODULES = (
    "json", "textwrap", "shlex", "glob", "fnmatch", "base64", "bisect", "heapq", "random", "statistics",
    "string", "fractions", "difflib", "csv", "shutil", "tempfile", "pathlib", "copy", "pprint", "calendar",
    "colorsys", "contextlib", "dataclasses", "enum", "functools", "getopt", "gzip", "hmac", "html", "ipaddress",
    "keyword", "linecache", "mimetypes", "numbers", "operator", "queue", "sched", "secrets", "timeit", "tokenize",
    "traceback", "types", "uuid", "warnings", "zipfile", "argparse", "datetime", "decimal", "inspect", "logging",
    "pickle", "quopri", "uu", "wave", "webbrowser", "zipapp", "codecs", "weakref", "locale", "gettext",
)
ROBOTS = "User-agent: *\nDisallow: /private/\n"  # the crawl must skip the one page linked under /private/
QUESTION = "What does `{name}` do?"
CHOICES = 4


def chatml_prompt(question: str) -> str:
    """The prompt text the fine-tuned model sees (ChatML, which `finetune` gives a tokenizer without a template)."""
    return f"<|im_start|>user\n{question}{EOS}\n<|im_start|>assistant\n"


def write_site(out: Path, n_pages: int) -> list[str]:
    """pydoc HTML pages of the first `n_pages` SITE_MODULES (held-out ones left out), an index linking them,
    robots.txt; the modules."""
    out.mkdir(parents=True, exist_ok=True)
    names, held = [], {f.stem for f in heldout_sources()}
    for name in SITE_MODULES:
        if len(names) == n_pages:
            break
        if name in held:
            continue
        try:
            module = importlib.import_module(name)
        except ImportError:  # removed in this Python (uu, for one, left in 3.13)
            continue
        (out / f"{name}.html").write_text(pydoc.html.page(pydoc.describe(module), pydoc.html.document(module, name)))
        names.append(name)
    links = "".join(f'<li><a href="{n}.html">{n}</a></li>\n' for n in names)
    (out / "index.html").write_text(f"<html><head><title>Python standard library</title></head><body>"
                                    f"<h1>Modules</h1><ul>\n{links}<li><a href=\"private/notes.html\">notes</a></li>"
                                    f"</ul></body></html>\n")
    (out / "private").mkdir(exist_ok=True)
    (out / "private" / "notes.html").write_text("<html><body><p>Not for crawlers.</p></body></html>\n")
    (out / "robots.txt").write_text(ROBOTS)
    return names


def stdlib_files() -> list[Path]:
    """The standard library's top-level modules, sorted."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def heldout_sources() -> list[Path]:
    """Every 25th top-level module under 60 kB: held out of pretraining (and of the site) for perplexity."""
    return [f for i, f in enumerate(stdlib_files()) if i % 25 == 12 and f.stat().st_size <= 60_000]


def stdlib_sources(max_bytes: int) -> tuple[list[Path], list[Path]]:
    """Top-level standard-library modules: those to train on (up to `max_bytes`), and the held-out ones."""
    files, held = stdlib_files(), heldout_sources()
    train, total = [], 0
    for f in files:
        if f not in held and total + f.stat().st_size <= max_bytes:
            train.append(f)
            total += f.stat().st_size
    if not train or not held:
        raise FileNotFoundError(f"too few Python sources under {sysconfig.get_paths()['stdlib']} for a held-out split")
    return train, held


@dataclass(frozen=True)
class Doc:
    """One documented function: `module.name` and the first sentence of its docstring."""
    name: str
    answer: str


def first_sentence(doc: str) -> str | None:
    """The docstring's first sentence when it is a plain one of 4-30 words (no doctest, no signature line)."""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    m = re.match(r"(.+?[.!?])(\s|$)", para)
    sentence = m.group(1) if m else para
    words = sentence.split()
    if not 4 <= len(words) <= 30 or ">>>" in sentence or "(" in words[0]:
        return None
    return sentence


def docstring_pairs(files: list[Path]) -> list[Doc]:
    """Public module-level functions with a usable first docstring sentence, one per distinct answer."""
    docs, seen = [], set()
    for f in files:
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):  # a stdlib test fixture, or a non-UTF-8 file
            continue
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                answer = first_sentence(ast.get_docstring(node) or "")
                if answer and answer not in seen:
                    seen.add(answer)
                    docs.append(Doc(f"{f.stem}.{node.name}", answer))
    return docs


def split_docs(docs: list[Doc], n_heldout: int) -> tuple[list[Doc], list[Doc]]:
    """(train, held out) by a hash of the name, so the split does not depend on the order or the count."""
    ranked = sorted(docs, key=lambda d: hashlib.sha1(d.name.encode()).hexdigest())
    return ranked[n_heldout:], ranked[:n_heldout]


def others(docs: list[Doc], d: Doc, k: int, rng: random.Random) -> list[Doc]:
    """`k` random functions of modules other than `d`'s."""
    module = d.name.split(".")[0]
    pool = [o for o in docs if o.name.split(".")[0] != module]
    if len(pool) < k:
        raise ValueError(f"{len(docs)} documented functions are too few to draw {k} from other modules than {module}")
    return rng.sample(pool, k)


def write_sft(docs: list[Doc], path: Path) -> int:
    """Chat records: the question about a function -> its docstring's first sentence."""
    with path.open("w") as fh:
        for d in docs:
            fh.write(json.dumps({"messages": [{"role": "user", "content": QUESTION.format(name=d.name)},
                                              {"role": "assistant", "content": d.answer}]}) + "\n")
    return len(docs)


def write_dpo(docs: list[Doc], wrong: list[Doc], path: Path, seed: int) -> int:
    """Preference records: chosen the function's own sentence, rejected that of a function from `wrong` (another
    module's, from a set never used as a right answer, so training never pushes an answer both up and down)."""
    rng = random.Random(seed)
    with path.open("w") as fh:
        for d in docs:
            rejected = others(wrong, d, 1, rng)[0].answer
            fh.write(json.dumps({"prompt": [{"role": "user", "content": QUESTION.format(name=d.name)}],
                                 "chosen": [{"role": "assistant", "content": d.answer}],
                                 "rejected": [{"role": "assistant", "content": rejected}]}) + "\n")
    return len(docs)


def write_mc_task(heldout: list[Doc], out: Path, seed: int) -> Path:
    """A four-choice task in lm-eval's YAML form over the held-out functions; the wrong choices are other held-out
    functions' (of other modules), so no choice was ever a training answer."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "docstring_mc.jsonl").open("w") as fh:
        for d in heldout:
            choices = [d.answer, *(o.answer for o in others(heldout, d, CHOICES - 1, rng))]
            rng.shuffle(choices)
            fh.write(json.dumps({"prompt": chatml_prompt(QUESTION.format(name=d.name)), "choices": choices,
                                 "answer": choices.index(d.answer)}) + "\n")
    yaml_path = out / "docstring_mc.yaml"
    yaml_path.write_text(
        "# Which sentence opens this held-out standard-library function's docstring? Four choices; chance 0.25.\n"
        "task: docstring_mc\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n    test: docstring_mc.jsonl\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"{{prompt}}\"\n"
        "target_delimiter: \"\"\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: answer\n"
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    return yaml_path
