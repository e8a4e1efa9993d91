"""Document filters and the registry the pipeline builds them from.

A pipeline config lists steps such as `{"filter": "gopher_quality", "min_words": 50}`;
`build_filter(spec)` (or `FILTERS[name](options)`) turns one into a step with its own drop counts
and examples. Filters:

  heuristic          the guide's whole-document heuristics            FilterStep
  gopher_quality     Gopher's quality rules (datatrove's thresholds)  FilterStep
  gopher_repetition  Gopher's repetition rules                        FilterStep
  fineweb            FineWeb's line-punctuation / short-line / dup / list rules   FilterStep
  c4                 C4's line cleaning (removes lines, may drop the doc)        MapStep
  language           fastText lid.176 language id (meta language, language_score) FilterStep
  perplexity         reference-LM perplexity band (meta perplexity), batched      PerplexityStep

Each filter's options are a pydantic model (`*Config`, defaults = the published thresholds);
an unknown filter or option is a one-line `ConfigError` naming it.
"""
from __future__ import annotations

from typing import Any, Callable

from pydantic import BaseModel, ValidationError

from lmforge.config import ConfigError
from lmforge.data.base import FilterStep, MapStep, Step
from lmforge.data.filters.c4 import C4Config, c4_clean, make_c4_clean
from lmforge.data.filters.language import LanguageConfig, make_language
from lmforge.data.filters.perplexity import PerplexityConfig, PerplexityStep, perplexities
from lmforge.data.filters.quality import (FineWebConfig, GopherQualityConfig, HeuristicConfig, Rebuildable,
                                          make_fineweb, make_gopher_quality, make_heuristic)
from lmforge.data.filters.repetition import GopherRepetitionConfig, make_gopher_repetition


def parse_options(config_cls: type[BaseModel], filter_name: str, options: dict[str, Any]) -> BaseModel:
    """Validate one filter's options; errors name `filter_name.key` and what is accepted."""
    if not isinstance(options, dict):
        raise ConfigError(f"{filter_name}: options must be a mapping of option names to values (got {options!r})")
    options = {k: v for k, v in options.items() if k != "filter"}
    try:
        return config_cls.model_validate(options)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"] if p != "[key]") or "<options>"
            if "[key]" in e["loc"]:  # a mapping's key, e.g. top_n_grams: {two: 0.2}
                msg = f"not a valid key: {e['msg']} (got {e.get('input')!r})"
            elif e["type"] == "extra_forbidden":
                msg = f"unknown option (accepted: {', '.join(config_cls.model_fields)})"
            elif e["type"] == "missing":
                msg = "required"
            else:
                msg = f"{e['msg']} (got {e.get('input')!r})"
            problems.append(f"{filter_name}.{key}: {msg}")
        raise ConfigError("; ".join(problems)) from None


def _filter(name: str, config_cls, make) -> Callable[[dict], Step]:
    def build(options: dict | None = None) -> Step:
        cfg = parse_options(config_cls, name, options or {})
        return FilterStep(cfg.name or name, Rebuildable(make, cfg))
    build.config = config_cls
    return build


def _c4(options: dict | None = None) -> Step:
    cfg = parse_options(C4Config, "c4", options or {})
    return MapStep(cfg.name or "c4", Rebuildable(make_c4_clean, cfg))


def _perplexity(options: dict | None = None) -> Step:
    return PerplexityStep(parse_options(PerplexityConfig, "perplexity", options or {}))


_c4.config = C4Config
_perplexity.config = PerplexityConfig

FILTERS: dict[str, Callable[[dict], Step]] = {
    "heuristic": _filter("heuristic", HeuristicConfig, make_heuristic),
    "gopher_quality": _filter("gopher_quality", GopherQualityConfig, make_gopher_quality),
    "gopher_repetition": _filter("gopher_repetition", GopherRepetitionConfig, make_gopher_repetition),
    "fineweb": _filter("fineweb", FineWebConfig, make_fineweb),
    "c4": _c4,
    "language": _filter("language", LanguageConfig, make_language),
    "perplexity": _perplexity,
}


def build_filter(spec: dict[str, Any]) -> Step:
    """`{"filter": NAME, **options}` -> the step."""
    if not isinstance(spec, dict) or "filter" not in spec:
        raise ConfigError(f"filter: missing; a filter step is a mapping like {{filter: gopher_quality, min_words: 50}} "
                          f"(got {spec!r})")
    name = spec["filter"]
    if name not in FILTERS:
        raise ConfigError(f"filter: unknown filter {name!r} (known: {', '.join(FILTERS)})")
    return FILTERS[name]({k: v for k, v in spec.items() if k != "filter"})


__all__ = [
    "FILTERS", "build_filter", "parse_options", "perplexities",
    "C4Config", "FineWebConfig", "GopherQualityConfig", "GopherRepetitionConfig", "HeuristicConfig",
    "LanguageConfig", "PerplexityConfig", "PerplexityStep",
    "c4_clean", "make_c4_clean", "make_fineweb", "make_gopher_quality", "make_gopher_repetition", "make_heuristic",
    "make_language",
]
