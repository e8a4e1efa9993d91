"""`lmforge data run|filter|pii|extract|dedup|crawl`: whole pipelines, single steps, and the crawler."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field

from lmforge.command import CliError, Command
from lmforge.config import Strict


def _pipeline_config():
    from lmforge.data.pipeline import PipelineConfig
    return PipelineConfig


class StepFiles(Strict):
    """What every single-step command reads and writes."""
    input: str = Field(description="documents in: JSONL(.gz) or Parquet (any format `data run` reads)")
    output: Path = Field(description="documents out: .jsonl, .jsonl.gz or .parquet")
    text_field: str = Field("text", description="JSON field holding the text")


class FilterCommand(StepFiles):
    filter: list[str] = Field(description="filter name (heuristic, gopher_quality, gopher_repetition, c4, fineweb, "
                                          "language, perplexity); several apply in order")
    set: list[str] = Field([], description="a filter option as NAME.KEY=VALUE, e.g. gopher_quality.min_doc_words=20")


class PiiCommand(StepFiles):
    kinds: list[str] | None = Field(None, description="a subset of email, phone, ssn, credit_card, ip (None: all); "
                                                      "on the command line comma-separated")


class ExtractCommand(StepFiles):
    timeout_s: float = Field(10.0, gt=0, description="seconds of HTML extraction per document")


def _dedup_command():
    from lmforge.data.dedup import DedupConfig

    class DedupCommand(StepFiles, DedupConfig):
        """The dedup step's settings (DedupConfig) over one input."""

    return DedupCommand


class CrawlCommand(Strict):
    start_url: str = Field(description="where the crawl starts; it stays within this host unless allowed_domains says")
    out: Path = Field(description="output directory (crawl.warc.gz, documents.jsonl, crawl_report.json)")
    max_pages: int = Field(100, ge=0, description="page URLs requested over all runs")
    max_depth: int = Field(3, ge=0, description="links followed from the start page (0: the start page only)")
    delay_s: float = Field(1.0, ge=0, description="seconds between requests to one host (robots.txt may ask more)")
    concurrency: int = Field(4, ge=1, description="pages fetched at once (several hosts at a time)")
    allow_private: bool = Field(False, description="allow private, loopback and link-local addresses (off: SSRF guard)")
    allow_net: list[str] = Field([], description="allow only these private networks (CIDR), e.g. 127.0.0.0/8")
    allowed_domains: list[str] = Field([], description="domains to stay in, subdomains included (empty: the start "
                                                       "URL's host)")
    max_bytes: int = Field(5_000_000, ge=1, description="largest page read, in bytes")
    max_redirects: int = Field(5, ge=0, description="redirects followed per page")
    timeout_s: float = Field(20.0, gt=0, description="seconds per request")
    user_agent: str | None = Field(None, description="the User-Agent header (None: lmforge-crawler/VERSION)")
    extract_timeout_s: float = Field(10.0, gt=0, description="seconds of HTML extraction per page")
    quiet: bool = Field(False, description="no per-page progress lines")


def run_pipeline_command(cfg) -> int:
    from lmforge.data.pipeline import run_pipeline

    report = run_pipeline(cfg)
    print_report(report)
    print(f"report: {cfg.out_dir / 'report.json'}, {cfg.out_dir / 'report.png'}")
    return 0


def print_report(report: dict) -> None:
    """The funnel table, where the documents went, and the first skipped inputs."""
    from lmforge.data.pipeline import funnel_table

    print(funnel_table(report))
    print(f"documents out: {report['docs_out']:,} in {len(report['outputs'])} file(s): "
          f"{report['outputs'][0] if report['outputs'] else '-'}{' ...' if len(report['outputs']) > 1 else ''}")
    if report["read"]["examples"]:
        print("skipped input (first): " + "; ".join(report["read"]["examples"][:5]))


def _run_steps(specs: list[dict], cfg: StepFiles) -> int:
    from lmforge.data.pipeline import build_step, run_single

    for spec in specs:
        (name, opts), = spec.items()
        build_step(name, opts, check_only=True)
    print_report(run_single(specs, cfg.input, cfg.output, cfg.text_field))
    return 0


def run_filter(cfg: FilterCommand) -> int:
    from lmforge.config import parse_override, set_dotted

    opts: dict = {}
    for item in cfg.set:
        keys, value = parse_override(item)
        set_dotted(opts, keys, value)
    unknown = set(opts) - set(cfg.filter)
    if unknown:
        raise CliError(f"--set {sorted(unknown)[0]}.…: not one of the --filter names {cfg.filter}")
    return _run_steps([{name: opts.get(name, {})} for name in cfg.filter], cfg)


def run_pii(cfg: PiiCommand) -> int:
    kinds = [k.strip() for item in cfg.kinds or [] for k in item.split(",") if k.strip()]
    return _run_steps([{"pii": {"kinds": kinds} if kinds else {}}], cfg)


def run_extract(cfg: ExtractCommand) -> int:
    return _run_steps([{"extract": {"timeout_s": cfg.timeout_s}}], cfg)


def run_dedup(cfg) -> int:
    from lmforge.data.dedup import DedupConfig

    return _run_steps([{"dedup": cfg.model_dump(include=set(DedupConfig.model_fields))}], cfg)


def run_crawl(cfg: CrawlCommand) -> int:
    from lmforge.data.crawl import DEFAULT_USER_AGENT, crawl

    r = crawl(cfg.start_url, cfg.out, max_pages=cfg.max_pages, max_depth=cfg.max_depth, delay_s=cfg.delay_s,
              concurrency=cfg.concurrency, allow_private=cfg.allow_net or cfg.allow_private,
              allowed_domains=cfg.allowed_domains or None, max_bytes=cfg.max_bytes, max_redirects=cfg.max_redirects,
              timeout_s=cfg.timeout_s, user_agent=cfg.user_agent or DEFAULT_USER_AGENT,
              extract_timeout_s=cfg.extract_timeout_s, progress=not cfg.quiet).to_dict()
    skipped = {k: v for k, v in r["skipped"].items() if v}
    print(f"fetched {r['fetched']} pages ({r['bytes']:,} bytes) in {r['seconds']:.1f} s; {r['documents']} documents; "
          f"{r['frontier_left']} URLs left in the frontier")
    if skipped:
        print("skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(skipped.items(), key=lambda kv: -kv[1])))
    if skipped.get("ssrf") and not r["fetched"]:
        print("hint: the start URL resolves to a private or loopback address; pass --allow-private to crawl it")
    print(f"written: {cfg.out / 'crawl.warc.gz'}, {cfg.out / 'documents.jsonl'}, {cfg.out / 'crawl_report.json'}")
    return 0


STEP_FILES = ("input", "output")
COMMANDS = [
    Command("data run", "readers + an ordered list of steps over sharded inputs, resumable", _pipeline_config,
            run_pipeline_command,
            description="Run a data pipeline. Prints a funnel; writes document shards, config.yaml, report.json and "
                        "report.png to out_dir. Re-running resumes."),
    Command("data filter", "quality filters (heuristic, gopher_quality, gopher_repetition, c4, fineweb, language, "
                           "perplexity)", lambda: FilterCommand, run_filter, positionals=STEP_FILES),
    Command("data pii", "replace emails, phones, SSNs, credit cards and public IPs", lambda: PiiCommand, run_pii,
            positionals=STEP_FILES),
    Command("data extract", "HTML documents -> main text (trafilatura)", lambda: ExtractCommand, run_extract,
            positionals=STEP_FILES, aliases={"--timeout": "timeout_s"}),
    Command("data dedup", "exact and MinHash-LSH near-duplicate removal", _dedup_command, run_dedup,
            positionals=STEP_FILES),
    Command("data crawl", "polite crawler: robots.txt, per-host delay, SSRF guard, WARC + JSONL", lambda: CrawlCommand,
            run_crawl, positionals=("start_url",),
            aliases={"--delay": "delay_s", "--timeout": "timeout_s", "--extract-timeout": "extract_timeout_s",
                     "--allowed-domain": "allowed_domains"},
            description="Crawl from START_URL within its host; writes a WARC file and documents as JSONL; a stopped "
                        "crawl resumes from its saved frontier."),
]
