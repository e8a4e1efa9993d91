"""Task names, tags and groups as lm-eval resolves them: the index of task YAMLs and group aggregation.

A group YAML (`group:` with a `task:` list of task names, tags, nested groups or inline task configs,
and `aggregate_metric_list`) is read as lm-eval reads it. Names resolve through an index of every
YAML under the built-in directory, the directories of the YAML files given, and `include_path`
(lm-eval's `--include_path`); the first definition of a name wins, the built-ins last. Indexing
reads each file without importing its `!function`s, so only the evaluated tasks' code runs.
A group's score is the size-weighted mean of its leaf tasks' scores with the pooled standard error,
exactly lm-eval's Group.aggregate.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lmforge.eval import metrics as M
from lmforge.eval import tasks as T


@dataclass
class Group:
    """A named set of tasks and groups, and the metrics aggregated over its leaf tasks."""
    name: str
    children: list = field(default_factory=list)  # Task | Group
    aggregate: list[dict] = field(default_factory=list)
    alias: str | None = None

    def leaves(self) -> list[T.Task]:
        out = []
        for c in self.children:
            out += c.leaves() if isinstance(c, Group) else [c]
        return out


@dataclass
class Index:
    """Where every task, group and tag name is defined: {name: YAML path}, {tag: [task names]}."""
    tasks: dict[str, Path] = field(default_factory=dict)
    groups: dict[str, Path] = field(default_factory=dict)
    tags: dict[str, list[str]] = field(default_factory=dict)
    broken: dict[Path, str] = field(default_factory=dict)  # YAML files that could not be read, with why

    def names(self) -> list[str]:
        return sorted({*self.tasks, *self.groups, *self.tags})


def build_index(dirs: list[Path]) -> Index:
    """Every YAML under `dirs` (searched in order, the built-ins last) by the names it defines."""
    index = Index()
    seen: set[Path] = set()
    for d in [*dirs, T.BUILTIN_DIR]:
        for path in sorted(Path(d).rglob("*.yaml")):
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            try:
                cfg = T.read_task_yaml(path, functions=False)
            except T.TaskError as e:
                index.broken[path] = str(e)
                continue
            if isinstance(cfg.get("task"), list) and "group" in cfg:
                index.groups.setdefault(str(cfg["group"]), path)
            elif isinstance(cfg.get("task"), str):
                index.tasks.setdefault(cfg["task"], path)
                # before lm-eval 0.4.4 a task's `group:` key was what `tag:` is now
                for key in ("tag", "group"):
                    tags = cfg.get(key) or []
                    for tag in [tags] if isinstance(tags, str) else tags:
                        index.tags.setdefault(str(tag), []).append(cfg["task"])
    return index


def load(specs: list[str], data_dir: Path | None = None, include: list[Path] | None = None) -> list:
    """Tasks and groups for `--tasks` (names, tags, task or group YAML paths), their data loaded."""
    dirs = [*(include or [])]
    for s in specs:
        p = Path(s)
        if p.suffix in (".yaml", ".yml") and p.parent not in dirs:
            dirs.append(p.parent)
    missing = [d for d in include or [] if not Path(d).is_dir()]
    if missing:
        raise T.TaskError(f"--include-path {missing[0]}: no such directory")
    loader = _Loader(build_index(dirs), data_dir)
    items = []
    for spec in specs:
        path = Path(spec)
        if path.suffix in (".yaml", ".yml"):
            items.append(loader.from_file(path))
        else:
            items += loader.by_name(spec)
    return items


class _Loader:
    """Builds tasks and groups from the index, each task's data loaded once."""

    def __init__(self, index: Index, data_dir: Path | None):
        self.index, self.data_dir = index, data_dir
        self.loaded: dict[str, T.Task] = {}

    def from_file(self, path: Path):
        cfg = T.read_task_yaml(path)
        if "group" in cfg and isinstance(cfg.get("task"), list):
            return self.group(cfg, path, ())
        if isinstance(cfg.get("task"), list) or "group" in cfg and "task" not in cfg:
            raise T.TaskError(f"{path}: `task:` must be a list of tasks in a group YAML (with `group:`)")
        return self.task(cfg, path)

    def task(self, cfg: dict, path: Path) -> T.Task:
        name = str(cfg.get("task") or path.stem)
        if name not in self.loaded:
            self.loaded[name] = T.make_task(cfg, path, self.data_dir)
        return self.loaded[name]

    def by_name(self, name: str, parents: tuple[str, ...] = ()) -> list:
        if name in self.index.groups:
            path = self.index.groups[name]
            return [self.group(T.read_task_yaml(path), path, parents)]
        if name in self.index.tasks:
            path = self.index.tasks[name]
            return [self.task(T.read_task_yaml(path), path)]
        if name in self.index.tags:
            return [t for n in self.index.tags[name] for t in self.by_name(n, parents)]
        broken = "".join(f"; {p} could not be read ({why})" for p, why in list(self.index.broken.items())[:2])
        builtin = ", ".join(n for n in self.index.names() if not n.startswith("mmlu_")) + ", mmlu_<subject>"
        raise T.TaskError(f"unknown task {name!r}: give a task or group YAML, a name defined in one (with "
                          f"--include-path DIR), or a built-in ({builtin}); any lm-eval task runs with --bridge "
                          f"lm-eval{broken}")

    def group(self, cfg: dict, path: Path, parents: tuple[str, ...]) -> Group:
        name = str(cfg["group"])
        if name in parents:
            raise T.TaskError(f"group {name} contains itself ({' > '.join([*parents, name])})")
        unknown = sorted(set(cfg) - {"group", "group_alias", "task", "aggregate_metric_list", "metadata"})
        if unknown:
            raise T.TaskError(f"group {name}: unsupported key(s) {', '.join(unknown)} ({path})")
        entries = cfg["task"] if isinstance(cfg["task"], list) else [cfg["task"]]
        children = []
        for entry in entries:
            if isinstance(entry, str):
                children += self.by_name(entry, (*parents, name))
            elif isinstance(entry, dict) and "group" in entry:
                children.append(self.group(entry, path, (*parents, name)))
            elif isinstance(entry, dict) and entry.get("task") in self.index.tasks:  # a known task, overridden
                base_path = self.index.tasks[entry["task"]]
                children.append(self.task({**T.read_task_yaml(base_path), **entry}, base_path))
            elif isinstance(entry, dict) and isinstance(entry.get("task"), str):
                children.append(self.task(entry, path))
            else:
                raise T.TaskError(f"group {name}: a `task:` entry must be a name or a task config, got {entry!r}")
        aggregate = []
        for a in cfg.get("aggregate_metric_list") or []:
            a = dict(a)
            if a.get("aggregation", "mean") != "mean" or "metric" not in a:
                raise T.TaskError(f"group {name}: aggregate_metric_list entries need a `metric` and aggregation "
                                  f"mean (lm-eval's only one), got {a}")
            if isinstance(a.get("filter_list"), str):
                a["filter_list"] = [a["filter_list"]]
            aggregate.append(a)
        return Group(name, children, aggregate, cfg.get("group_alias"))


def aggregate(group: Group, results: dict[str, dict]) -> dict:
    """The group's row: per aggregated metric (and filter), the leaf tasks' weighted mean and pooled stderr."""
    leaves = [t.name for t in group.leaves()]
    out: dict = {"n_samples": sum(results[t]["n_samples"] for t in leaves)}
    for a in group.aggregate:
        metric, by_size = a["metric"], bool(a.get("weight_by_size", True))
        filters = a.get("filter_list")
        if filters is None:  # every filter the leaves report this metric under
            filters = sorted({k.partition(",")[2] or "none" for t in leaves for k in results[t]
                              if k.partition(",")[0] == metric})
        for f in filters:
            key = metric if f == "none" else f"{metric},{f}"
            err = f"{metric}_stderr" if f == "none" else f"{metric}_stderr,{f}"
            have = [t for t in leaves if key in results[t]]
            if not have:
                continue
            values = [results[t][key] for t in have]
            sizes = [results[t]["n_samples"] for t in have]
            out[key] = M.weighted_mean(values, sizes, by_size)
            stderrs = [results[t].get(err) for t in have]
            out[err] = None if None in stderrs else M.group_stderr(stderrs, sizes, by_size)
    return out
