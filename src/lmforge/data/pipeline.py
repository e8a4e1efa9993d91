"""`lmforge data run`: readers, then an ordered list of steps, over input shards in worker processes.

Input files are grouped into shards of about `shard_mb` each (a large file is a shard alone). Each shard's output is written under a temporary name, renamed, and
only then marked done (`_markers/`), so a killed run restarted with the same config skips finished
shards and ends with exactly the output of an uninterrupted run. A `dedup` step is global: the
steps before it run per shard into `_stage/`, MinHash signatures of every shard are clustered
together, and the steps after it run per shard on what survives.
"""
from __future__ import annotations

import copy
import gzip
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Literal

from pydantic import Field, field_validator

from lmforge.config import Strict
from lmforge.data.base import Document, Step, StepStats, counted
from lmforge.data.readers import ReadReport, iter_documents, list_inputs
from lmforge.errors import UserError


class PipelineConfig(Strict):
    inputs: list[str] = Field(description="files, directories, globs or hf:NAME datasets")
    out_dir: Path = Field(description="where document shards, report.json and report.png go")
    steps: list[dict | str] = Field([], description="ordered steps, each a name or {name: {options}}; "
                                                     "empty = read and write only")
    workers: int = Field(1, gt=0, description="worker processes (one shard per task)")
    shard_mb: float = Field(32.0, gt=0, description="input files are grouped into shards of about this size")
    executor: Literal["local", "ray"] = Field("local", description="local processes, or Ray tasks")
    ray_address: str | None = Field(None, description="executor=ray: cluster address; None starts a local Ray")
    text_field: str = "text"
    output_format: Literal["jsonl.gz", "jsonl", "parquet"] = "jsonl.gz"

    @field_validator("steps")
    @classmethod
    def _steps(cls, steps: list) -> list[dict]:
        out = []
        for i, s in enumerate(steps):
            if isinstance(s, str):
                s = {s: {}}
            if not isinstance(s, dict) or len(s) != 1:
                raise ValueError(f"steps[{i}] must be a step name or a mapping {{name: {{options}}}}")
            (name, opts), = s.items()
            build_step(name, opts or {}, check_only=True)
            out.append({name: opts or {}})
        if sum("dedup" in s for s in out) > 1:
            raise ValueError("only one dedup step per pipeline")
        return out


def build_step(name: str, opts: dict, check_only: bool = False) -> Step | None:
    """A pipeline step from its YAML name and options; unknown names or options fail with the key."""
    if name == "pii":
        from lmforge.data.pii import pii_step
        return None if check_only else pii_step(**opts)
    if name == "extract":
        from lmforge.data.extract import extract_step
        return None if check_only else extract_step(**opts)
    if name == "dedup":
        from lmforge.data.dedup_lsh import DedupConfig
        DedupConfig(**opts)
        return None
    from lmforge.data.filters import FILTERS
    if name not in FILTERS:
        known = ", ".join(["dedup", "extract", "pii", *sorted(FILTERS)])
        raise UserError(f"unknown step {name!r}; known: {known}")
    step = FILTERS[name](opts)  # validates options even when only checking
    return None if check_only else step


# ---- document files ---------------------------------------------------------------------------

def write_documents(docs: Iterable[Document], path: Path) -> int:
    """Write .jsonl, .jsonl.gz or .parquet via a temp file and rename; returns the count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n = 0
    if path.name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq
        rows = [{"id": d.id, "text": d.text, "url": d.url, "source": d.source, "meta": json.dumps(d.meta)}
                for d in docs]
        pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(
            [("id", pa.string()), ("text", pa.string()), ("url", pa.string()), ("source", pa.string()),
             ("meta", pa.string())])), tmp)
        n = len(rows)
    else:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(tmp, "wt", encoding="utf-8") as f:
            for d in docs:
                f.write(d.to_json() + "\n")
                n += 1
    os.replace(tmp, path)
    return n


def read_stage(path: Path) -> Iterator[Document]:
    """Documents of a shard this pipeline wrote (JSONL or JSONL.gz)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield Document.from_dict(json.loads(line))


def apply_steps(docs: Iterable[Document], specs: list[dict], stats: dict[str, StepStats]) -> Iterator[Document]:
    """Chain the steps lazily, each counted under its own name (a name used twice gets #2)."""
    for spec in specs:
        (name, opts), = spec.items()
        key = name if name not in stats else f"{name}#{sum(k.split('#')[0] == name for k in stats) + 1}"
        stats[key] = StepStats(key)
        docs = counted(build_step(name, opts), docs, stats[key])
    return docs


# ---- shard tasks (run in worker processes) ------------------------------------------------------

def dedup_index(steps: list[dict]) -> int | None:
    """Position of the (single, global) dedup step, or None."""
    return next((i for i, s in enumerate(steps) if "dedup" in s), None)


def _marker(out: Path, phase: str, shard: int) -> Path:
    return out / "_markers" / f"{phase}-{shard:05d}.json"


def _done(out: Path, phase: str, shard: int) -> dict | None:
    m = _marker(out, phase, shard)
    return json.loads(m.read_text()) if m.is_file() else None


def _mark(out: Path, phase: str, shard: int, payload: dict) -> None:
    m = _marker(out, phase, shard)
    m.parent.mkdir(parents=True, exist_ok=True)
    tmp = m.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, m)


def _shard_name(cfg: PipelineConfig, shard: int) -> str:
    return f"shard-{shard:05d}.{cfg.output_format}"


def run_first_half(cfg_dict: dict, shard: int, sources: list[str]) -> dict:
    """Read one shard's inputs and run the steps before dedup (all steps when there is none)."""
    cfg = PipelineConfig.model_validate(cfg_dict)
    out = cfg.out_dir
    done = _done(out, "a", shard)
    if done is not None:
        return done
    k = dedup_index(cfg.steps)
    report = ReadReport()
    stats: dict[str, StepStats] = {}
    docs = apply_steps(iter_documents(sources, cfg.text_field, report), cfg.steps[:k], stats)
    if k is None:
        target = out / _shard_name(cfg, shard)
    else:
        target = out / "_stage" / f"shard-{shard:05d}.jsonl.gz"
    n = write_documents(docs, target)
    payload = {"read": report.to_dict(), "steps": {name: s.to_dict() for name, s in stats.items()}, "n_out": n}
    if k is not None:
        from lmforge.data.dedup import write_signatures
        from lmforge.data.dedup_lsh import DedupConfig
        dcfg = DedupConfig(**cfg.steps[k]["dedup"])
        t0 = time.perf_counter()
        write_signatures(read_stage(target), out / "_stage" / f"sig-{shard:05d}", shard, dcfg)
        payload["dedup_seconds"] = time.perf_counter() - t0
    _mark(out, "a", shard, payload)
    return payload


def run_second_half(cfg_dict: dict, shard: int, removed_path: str) -> dict:
    """Drop this shard's duplicates and run the steps after dedup."""
    cfg = PipelineConfig.model_validate(cfg_dict)
    out = cfg.out_dir
    done = _done(out, "b", shard)
    if done is not None:
        return done
    from lmforge.data.dedup import dedup_filter
    k = dedup_index(cfg.steps)
    stats = {"dedup": StepStats("dedup")}
    docs = counted(dedup_filter(Path(removed_path), shard), read_stage(out / "_stage" / f"shard-{shard:05d}.jsonl.gz"),
                   stats["dedup"])
    docs = apply_steps(docs, cfg.steps[k + 1:], stats)
    n = write_documents(docs, out / _shard_name(cfg, shard))
    payload = {"steps": {name: s.to_dict() for name, s in stats.items()}, "n_out": n}
    _mark(out, "b", shard, payload)
    return payload


def plan_shards(sources: list[str], shard_mb: float) -> list[list[str]]:
    """Consecutive input files grouped up to ~shard_mb each; deterministic for a given listing."""
    limit, shards, current, size = shard_mb * 1e6, [], [], 0
    for src in sources:
        n = Path(src).stat().st_size if Path(src).is_file() else limit  # an HF dataset is a shard alone
        if current and size + n > limit:
            shards.append(current)
            current, size = [], 0
        current.append(src)
        size += n
    if current:
        shards.append(current)
    return shards


def _map(cfg: PipelineConfig, fn, args: list[tuple]) -> list[dict]:
    """Run `fn` over the shard tasks; every task is idempotent (markers), so any executor gives one result."""
    if cfg.executor == "ray":
        import ray
        if not ray.is_initialized():
            ray.init(address=cfg.ray_address, num_cpus=None if cfg.ray_address else cfg.workers,
                     include_dashboard=False, log_to_driver=False)
        task = ray.remote(fn)
        return ray.get([task.remote(*a) for a in args])
    if cfg.workers == 1 or len(args) == 1:
        return [fn(*a) for a in args]
    with ProcessPoolExecutor(max_workers=min(cfg.workers, len(args))) as pool:
        return list(pool.map(fn, *zip(*args)))


# ---- the run ---------------------------------------------------------------------------------------

def run_pipeline(cfg: PipelineConfig) -> dict:
    """Run (or resume) the pipeline; returns the report that is also written to out_dir/report.json."""
    from lmforge.config import dump_config

    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    listing = ReadReport()
    sources = [str(s) for s in list_inputs(cfg.inputs, listing)]
    if not sources:
        raise UserError(f"no readable input in {', '.join(cfg.inputs)}")
    shards = plan_shards(sources, cfg.shard_mb)
    cfg_dict = cfg.model_dump(mode="json")
    _check_same_run(out, {"inputs": shards, "steps": cfg.steps, "output_format": cfg.output_format,
                          "text_field": cfg.text_field})
    first = _map(cfg, run_first_half, [(cfg_dict, i, group) for i, group in enumerate(shards)])
    second: list[dict] = []
    clustering: dict = {}
    k = dedup_index(cfg.steps)
    if k is not None:
        from lmforge.data.dedup_lsh import DedupConfig, find_duplicates
        stage = out / "_stage"
        clustering = _done(out, "dedup", 0) or {}
        if not clustering:
            t0 = time.perf_counter()
            removed = find_duplicates([stage / f"sig-{i:05d}" for i in range(len(shards))], stage,
                                      DedupConfig(**cfg.steps[k]["dedup"]))
            clustering = {"removed": str(removed), "dedup_seconds": time.perf_counter() - t0}
            _mark(out, "dedup", 0, clustering)
        second = _map(cfg, run_second_half, [(cfg_dict, i, clustering["removed"]) for i in range(len(shards))])
    report = _aggregate(cfg, sources, listing, [*first, *second, clustering], n_out=sum(
        p["n_out"] for p in (second or first)))
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot_funnel(report, out / "report.png")
    return report


def _check_same_run(out: Path, plan: dict) -> None:
    """Markers are only valid for the same inputs and steps: refuse to resume a different run."""
    path = out / "_markers" / "plan.json"
    if path.is_file():
        if json.loads(path.read_text()) != json.loads(json.dumps(plan)):
            raise UserError(f"{out} holds a run with other inputs or steps ({path}); use a new out_dir "
                             "or delete this one")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan))


def _aggregate(cfg: PipelineConfig, sources: list[str], listing: ReadReport, parts: list[dict], n_out: int) -> dict:
    """Sum the shard tasks' reports (and the dedup clustering's time) into the run's report."""
    read = copy.deepcopy(listing)
    steps: dict[str, StepStats] = {}
    for part in parts:
        if "read" in part:
            read.merge(ReadReport.from_dict(part["read"]))
        for name, s in part.get("steps", {}).items():
            steps.setdefault(name, StepStats(name)).merge(StepStats.from_dict(s))
        if "dedup_seconds" in part:  # signatures and clustering count as the dedup step's time
            steps.setdefault("dedup", StepStats("dedup")).seconds += part["dedup_seconds"]
    order = [name for spec in cfg.steps for name in spec]
    ordered = sorted(steps.values(), key=lambda s: order.index(s.name.split("#")[0]))
    return {"inputs": sources, "read": read.to_dict(), "errors": dict(read.skipped),
            "steps": [s.to_dict() for s in ordered], "docs_out": n_out,
            "outputs": sorted(str(p) for p in cfg.out_dir.glob(f"shard-*.{cfg.output_format}"))}


def funnel_table(report: dict) -> str:
    """The console funnel: documents after each step, what each dropped and why."""
    rows = [("read", report["read"]["n_docs"], report["read"]["n_docs"], sum(report["errors"].values()), 0.0,
             ", ".join(f"{k} {v}" for k, v in report["errors"].items()))]
    for s in report["steps"]:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(s["drops"].items(), key=lambda kv: -kv[1])[:3])
        rows.append((s["name"], s["docs_in"], s["docs_out"], s["docs_in"] - s["docs_out"], s["seconds"], reasons))
    start = rows[0][2] or 1
    lines = [f"{'step':<20} {'in':>9} {'out':>9} {'dropped':>9} {'kept %':>7} {'docs/s':>9}  reasons",
             "-" * 90]
    for name, n_in, n_out, dropped, secs, reasons in rows:
        rate = f"{n_in / secs:,.0f}" if secs > 0 else "-"
        lines.append(f"{name:<20} {n_in:>9,} {n_out:>9,} {dropped:>9,} {100 * n_out / start:>6.1f}% {rate:>9}  {reasons}")
    return "\n".join(lines)


def _plot_funnel(report: dict, path: Path) -> None:
    """report.png: documents remaining after each step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["read"] + [s["name"] for s in report["steps"]]
    counts = [report["read"]["n_docs"]] + [s["docs_out"] for s in report["steps"]]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.2))
    ax.barh(names[::-1], counts[::-1], color="#4c72b0")
    for y, c in enumerate(counts[::-1]):
        ax.text(c, y, f" {c:,}", va="center")
    ax.set_xlabel("documents")
    ax.set_title("lmforge data funnel")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_single(specs: list[dict], in_path: str, out_path: Path, text_field: str = "text") -> dict:
    """One step (or a few) over one input, in this process: `lmforge data filter|pii|extract|dedup IN OUT`."""
    report = ReadReport()
    docs = iter_documents([in_path], text_field, report)
    stats: dict[str, StepStats] = {}
    if any("dedup" in s for s in specs):
        from lmforge.data.dedup import dedup_documents
        from lmforge.data.dedup_lsh import DedupConfig
        kept, stats["dedup"] = dedup_documents(list(docs), DedupConfig(**specs[0]["dedup"]))
        n = write_documents(kept, out_path)
    else:
        n = write_documents(apply_steps(docs, specs, stats), out_path)
    return {"read": report.to_dict(), "errors": dict(report.skipped), "steps": [s.to_dict() for s in stats.values()],
            "docs_out": n, "outputs": [str(out_path)]}
