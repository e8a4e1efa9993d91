"""The one command style: configs, key=value overrides, flags as aliases, help read from the models, dispatch."""
from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, free_port, run_cli, save_tiny, stop_server, wait_healthy
from lmforge.cli import commands, main
from lmforge.command import CliError, parse
from lmforge.config import ConfigError, config_reference
from lmforge.errors import UserError

LONG_RUNNING = ["pretrain", "finetune", "data run", "serve", "eval tasks", "eval perplexity", "eval human"]


def command(name: str):
    [cmd] = [c for c in commands() if c.name == name]
    return cmd


def dummy_args(cmd) -> list[str]:
    """Values for a command's required positionals (never read: the tests stop before any work)."""
    model = cmd.config()
    return [f"x{i}" for i, k in enumerate(cmd.positionals) if model.model_fields[k].is_required()]


def test_every_long_running_command_takes_a_config_and_overrides():
    names = {c.name for c in commands()}
    assert set(LONG_RUNNING) <= names
    for name in LONG_RUNNING:
        cmd = command(name)
        assert cmd.config().model_config.get("extra") == "forbid", name  # a misspelt key is an error


@pytest.mark.parametrize("cmd", commands(), ids=lambda c: c.name)
def test_help_lists_every_key_with_type_and_default(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd.words, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for line in config_reference(cmd.config()):
        assert line in out, (cmd.name, line)


def test_a_misspelt_key_names_itself_in_every_command_before_torch_loads():
    """Each command, in one fresh interpreter: exit 2, one line naming the key, and torch never imported."""
    code = ("import sys, io, contextlib\nfrom lmforge.cli import commands, main\n"
            "for cmd in commands():\n"
            "    model = cmd.config()\n"
            "    args = [f'x{i}' for i, k in enumerate(cmd.positionals) if model.model_fields[k].is_required()]\n"
            "    err = io.StringIO()\n"
            "    with contextlib.redirect_stderr(err):\n"
            "        rc = main([*cmd.words, *args, 'nosuch_key=1'])\n"
            "    print(cmd.name, '|', rc, '|', err.getvalue().strip().replace(chr(10), ' / '))\n"
            "print('torch loaded:', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    lines = out.strip().splitlines()
    assert lines[-1] == "torch loaded: False"
    assert len(lines) - 1 == len(commands())
    for line in lines[:-1]:
        name, rc, err = (part.strip() for part in line.split("|"))
        assert rc == "2" and err.startswith("error: ") and "nosuch_key: unknown key" in err and " / " not in err, line


def test_flags_are_aliases_of_keys_and_overrides_come_last(tmp_path):
    serve = command("serve")
    by_flag = parse(serve, ["m", "--port", "8001", "--api-key", "a", "--api-key", "b", "--max-model-len", "64"])
    by_key = parse(serve, ["m", "port=8001", "api_key=[a, b]", "max_model_len=64"])
    assert by_flag == by_key and by_flag.port == 8001 and by_flag.api_key == ["a", "b"]
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("model: from-yaml\nport: 7000\nmax_batch: 4\n")
    got = parse(serve, [str(cfg), "--port", "7001", "max_batch=8"])
    assert (got.model, got.port, got.max_batch) == ("from-yaml", 7001, 8)  # yaml < flags < key=value
    assert parse(serve, ["--config", str(cfg), "other"]).model == "other"  # an argument beats the yaml too
    assert parse(serve, ["--config", str(cfg), "port=1"]).port == 1
    human = parse(command("eval human"), ["--models", "a", "b", "--prompts", "p.txt"])
    assert human.models == ["a", "b"]
    dedup = parse(command("data dedup"), ["in.jsonl", "out.jsonl", "--no-exact", "--bands", "7"])
    rows = type(dedup).model_fields["rows"].default  # untouched: the model's default
    assert (dedup.exact, dedup.near, dedup.bands, dedup.rows) == (False, True, 7, rows)
    tasks = parse(command("eval tasks"), ["m", "--tasks", "a,b", "--tasks", "c"])
    assert tasks.tasks == ["a", "b", "c"] and parse(command("eval tasks"), ["m", "tasks=[a, b]"]).tasks == ["a", "b"]


def test_bad_command_lines_are_one_line_errors(tmp_path, capsys):
    serve = command("serve")
    with pytest.raises(CliError, match="serve needs a MODEL argument"):
        parse(serve, [])
    with pytest.raises(CliError, match="one argument too many"):
        parse(serve, ["a", "b"])
    with pytest.raises(CliError, match="unrecognized arguments: --prot"):
        parse(serve, ["a", "--prot", "1"])
    (tmp_path / "a.yaml").write_text("port: 1\n")
    with pytest.raises(CliError, match="give one config file"):
        parse(serve, [str(tmp_path / "a.yaml"), "--config", str(tmp_path / "a.yaml")])
    for argv, message in [(["nosuch"], "unknown command 'nosuch'"), (["eval"], "choose one of tasks, compare"),
                          (["eval", "nosuch"], "unknown subcommand 'nosuch'"),
                          (["eval", "tasks", "m", str(ROOT / "configs/eval/gsm8k-local.yaml")],
                           "defines an lm-eval task or group, not an `eval tasks` config")]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, (argv, err)


def test_top_level_and_group_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {c.name} " in out for c in commands())
    assert main(["eval", "--help"]) == 0
    out = capsys.readouterr().out
    assert "eval tasks" in out and "pretrain" not in out


@pytest.mark.parametrize("name,function,renamed", [
    ("data crawl", "lmforge.data.crawl:crawl", {"user_agent": None}),  # None: crawl's DEFAULT_USER_AGENT
    ("data extract", "lmforge.data.extract:extract_step", {}),
    ("tokenizer train", "lmforge.tokens.tokenizer:train_bpe", {"out": "out_dir", "inputs": "paths"}),
    ("tokenize", "lmforge.tokens.shards:write_shards", {"inputs": "paths", "tokenizer": "tokenizer_spec"}),
    ("generate", "lmforge.infer.generation:generate_samples", {"model": "model_path", "input": "inp"}),
    ("chat", "lmforge.infer.generation:chat", {"model": "spec"}),
    ("export", "lmforge.model.export:export_model", {"model": "spec"}),
    # minutes: None on the command means 2 for quickstart and 9 with --full (the function is the first)
    ("quickstart", "lmforge.quickstart:quickstart", {"out": "out_dir", "minutes": None}),
])
def test_command_defaults_equal_the_python_functions(name, function, renamed):
    """A command's model and the function it calls state the same defaults (the model is what --help shows)."""
    import importlib

    module, attr = function.split(":")
    params = inspect.signature(getattr(importlib.import_module(module), attr)).parameters
    model = command(name).config()
    checked = 0
    for key, info in model.model_fields.items():
        param = params.get(renamed.get(key, key) or "")
        if param is None or param.default is inspect.Parameter.empty or info.is_required():
            continue
        default = info.get_default(call_default_factory=True)
        assert default == param.default or (default in ([], None) and param.default in (None, ())) \
            or str(default) == str(param.default), (name, key, default, param.default)
        checked += 1
    assert checked >= 1


def test_serve_takes_a_config_file_and_key_value_overrides(tmp_path):
    """`lmforge serve CONFIG.yaml port=N` (the README's way) with the example config, on a tiny model."""
    tiny = save_tiny(tmp_path / "tiny", max_positions=4096)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "configs/serve/smollm2-cpu.yaml",
                             f"model={tiny}", f"port={port}", "threads=1", "served_model_name=[tiny]"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}", 120, "lmforge serve")
        import httpx
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", trust_env=False).json()["data"]
        assert [m["id"] for m in models] == ["tiny"] and models[0]["max_model_len"] == 2048  # from the yaml
    finally:
        out = stop_server(proc)
    assert "ready: tiny" in out and "torch.float32" in out


def test_serve_device_that_is_not_there_names_the_setting(tmp_path):
    import torch

    if torch.cuda.is_available():  # a property of the machine, not a missing install: a skip is right
        pytest.skip("this machine has CUDA: the missing-device error cannot happen here")
    p = run_cli("serve", str(save_tiny(tmp_path / "tiny")), "--device", "cuda", check=False, timeout=60)
    assert p.returncode == 2 and p.stderr.strip() == "error: device=cuda but no CUDA device is visible"
    assert "loading" not in p.stdout  # refused before the port opened


def test_the_layers_contract_catches_an_upward_import(tmp_path):
    """lint-imports keeps the real package, and fails once a lower layer imports a higher one."""
    lint = Path(sys.executable).parent / "lint-imports"
    if not lint.exists():
        pytest.fail("lint-imports is missing: `make test` installs import-linter with the dev extra")
    ok = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout[-2000:]
    shutil.copytree(ROOT / "src", tmp_path / "src")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    load = tmp_path / "src" / "lmforge" / "model" / "load.py"
    load.write_text(load.read_text() + "\n\ndef _upward():\n    from lmforge.serve import server  # noqa: F401\n")
    env = {"PYTHONPATH": str(tmp_path / "src"), "PATH": str(Path(sys.executable).parent)}
    broken = subprocess.run([str(lint), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert broken.returncode != 0, broken.stdout[-2000:]
    assert "lmforge.model.load -> lmforge.serve.server" in broken.stdout, broken.stdout[-2000:]


@pytest.mark.parametrize("name,config", [("serve", "configs/serve/smollm2-cpu.yaml"),
                                         ("eval tasks", "configs/eval/smollm2-tasks.yaml"),
                                         ("eval perplexity", "configs/eval/smollm2-perplexity.yaml"),
                                         ("eval human", "configs/eval/human.yaml"),
                                         ("finetune", "configs/finetune/smollm2-lora-alpaca.yaml")])
def test_example_configs_are_valid_for_their_command(name, config):
    # ../shared/data is this machine's material, not something `make test` installs: skipping without it is right.
    if name == "finetune" and not (ROOT.parent / "shared" / "data" / "alpaca_5000.json").is_file():
        pytest.skip("the finetune example reads ../shared/data/alpaca_5000.json")
    cfg = parse(command(name), [str(ROOT / config)])
    assert cfg.model_fields_set  # the file's keys were read


def test_eval_tasks_from_a_config_with_overrides_writes_the_resolved_config_and_dtype(tmp_path):
    tiny = save_tiny(tmp_path / "tiny")
    lmeval = ROOT / "tests" / "data" / "lmeval"
    task = tmp_path / "mc.yaml"
    task.write_text((lmeval / "lmforge_mc.yaml").read_text().replace("tests/data/lmeval/mc.jsonl",
                                                                     str(lmeval / "mc.jsonl")))
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"model: {tiny}\ntasks: [{task}]\nlimit: 5\ndevice: cpu\nout: {tmp_path / 'new' / 'r.json'}\n")
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    p = run_cli("eval", "tasks", str(cfg), "limit=3", env=offline)
    assert "| lmforge_mc | 3 |" in p.stdout
    import json
    got = json.loads((tmp_path / "new" / "r.json").read_text())  # its directory is made first
    assert got["dtype"] == "float32" and got["config"]["limit"] == 3 and got["config"]["tasks"] == [str(task)]
    assert got["config"]["model"] == str(tiny) and got["results"]["lmforge_mc"]["n_samples"] == 3


@pytest.mark.parametrize("argv", [
    ["quickstart", "--data", "d.txt", "--out", "o", "--minutes", "0.5", "--seed", "1"],
    ["tokenizer", "train", "a", "b", "--out", "t", "--vocab-size", "500", "--min-frequency", "3", "--text-field", "x"],
    ["tokenize", "a", "--tokenizer", "char", "--out", "o", "--val-fraction", "0.2", "--text-field", "x"],
    ["generate", "m", "hi", "--template", "alpaca", "--input", "x", "--max-new-tokens", "5", "--temperature", "0",
     "--top-k", "5", "--top-p", "0.9", "--num-samples", "2", "--seed", "1", "--device", "cpu"],
    ["chat", "m", "--system", "s", "--max-new-tokens", "5", "--temperature", "0", "--top-p", "0.9", "--seed", "1",
     "--device", "cpu"],
    ["export", "m", "--out", "o", "--merge-lora", "--dtype", "bfloat16", "--overwrite"],
    ["serve", "m", "--host", "0.0.0.0", "--port", "1", "--api-key", "k", "--served-model-name", "n", "--max-batch", "2",
     "--max-queue", "3", "--max-model-len", "64", "--max-prefill-tokens", "32", "--request-timeout", "5",
     "--max-body-bytes", "2048", "--threads", "1", "--device", "cpu", "--dtype", "float32", "--backend", "vllm"],
    ["eval", "tasks", "m", "--tasks", "t", "--limit", "2", "--num-fewshot", "1", "--data-dir", "d", "--max-length", "9",
     "--batch-tokens", "9", "--device", "cpu", "--bridge", "lm-eval", "--out", "o.json"],
    ["eval", "compare", "a.json", "b.json"],
    ["eval", "perplexity", "m", "--data", "d.txt", "--max-length", "8", "--stride", "4", "--batch-size", "2", "--device",
     "cpu", "--out", "o.json"],
    ["eval", "human", "--models", "a", "b", "--prompts", "p.txt", "--out", "o", "--host", "h", "--port", "1",
     "--max-new-tokens", "4", "--temperature", "0.5", "--template", "none", "--seed", "2", "--device", "cpu"],
    ["data", "filter", "i", "o", "--text-field", "x", "--filter", "c4", "--filter", "heuristic", "--set", "c4.a=1"],
    ["data", "pii", "i", "o", "--kinds", "email,ip"],
    ["data", "extract", "i", "o", "--timeout", "3"],
    ["data", "dedup", "i", "o", "--ngram", "3", "--bands", "4", "--rows", "2", "--no-exact", "--no-near"],
    ["data", "crawl", "http://x/", "--out", "o", "--max-pages", "2", "--max-depth", "1", "--delay", "0",
     "--concurrency", "1", "--allow-private", "--allow-net", "127.0.0.0/8", "--allowed-domain", "x", "--max-bytes",
     "10", "--max-redirects", "1", "--timeout", "2", "--user-agent", "u", "--extract-timeout", "1", "--quiet"],
])
def test_every_flag_of_the_earlier_command_line_still_parses(argv):
    cmds = commands()
    [cmd] = [c for c in cmds if argv[:len(c.words)] == c.words]
    cfg = parse(cmd, argv[len(cmd.words):])
    given = {a.lstrip("-").replace("-", "_").removeprefix("no_") for a in argv if a.startswith("--")}
    given = {cmd.aliases.get("--" + g.replace("_", "-"), g) for g in given}
    assert given <= set(cfg.model_fields_set), given - set(cfg.model_fields_set)


# ---- exit codes: one line and 2 for user errors, a traceback and 1 for bugs -------------------------------

def _raising_parse(exc: BaseException):
    """A stand-in for lmforge.command.parse (which every command runs first) that raises `exc`."""
    def parse(cmd, argv):
        raise exc
    return parse


@pytest.mark.parametrize("exc, line", [
    (UserError("data.path: no such file x.jsonl"), "error: data.path: no such file x.jsonl"),
    (FileNotFoundError(2, "No such file or directory", "/no/such/input.txt"),
     "error: [Errno 2] No such file or directory: '/no/such/input.txt'"),
    (PermissionError(13, "Permission denied", "/root/secret"), "error: [Errno 13] Permission denied: '/root/secret'"),
    (FileExistsError(17, "File exists", "runs/a.txt"), "error: [Errno 17] File exists: 'runs/a.txt'"),
], ids=["UserError", "FileNotFoundError", "PermissionError", "FileExistsError"])
def test_a_user_error_is_one_line_and_exit_2(monkeypatch, capsys, exc, line):
    import lmforge.command

    monkeypatch.delenv("LMFORGE_TRACEBACK", raising=False)
    monkeypatch.setattr(lmforge.command, "parse", _raising_parse(exc))
    assert main(["info"]) == 2
    assert capsys.readouterr().err == line + "\n"


def test_stage_input_errors_are_user_errors():
    """The stages' own input errors (bad model, device, WARC file) are UserErrors, so the CLI reports them in one line."""
    from lmforge.data.warc import WarcReadError
    from lmforge.device import DeviceError
    from lmforge.model.load import ModelLoadError

    for cls in (CliError, ConfigError, DeviceError, ModelLoadError, WarcReadError):
        assert issubclass(cls, UserError), cls


@pytest.mark.parametrize("exc", [ZeroDivisionError("division by zero"), ValueError("an internal invariant broke"),
                                 KeyError("missing")], ids=["ZeroDivisionError", "ValueError", "KeyError"])
def test_an_internal_error_propagates_from_main(monkeypatch, capsys, exc):
    """A bug is not caught: main lets it through (Python then prints the traceback and exits 1), even a plain
    ValueError, which the CLI used to print as one line as if the user had made a mistake."""
    import lmforge.command

    monkeypatch.setattr(lmforge.command, "parse", _raising_parse(exc))
    with pytest.raises(type(exc)):
        main(["info"])
    assert "error:" not in capsys.readouterr().err


SITECUSTOMIZE = '''\
import os
if os.environ.get("LMFORGE_TEST_RAISE"):  # make every command fail the way the test asks, before any work
    import lmforge.command
    from lmforge.errors import UserError

    def parse(cmd, argv):
        kind, message = os.environ["LMFORGE_TEST_RAISE"].split(":", 1)
        raise {"UserError": UserError, "ValueError": ValueError, "ZeroDivisionError": ZeroDivisionError}[kind](message)

    lmforge.command.parse = parse
'''


@pytest.mark.parametrize("entry", ["python -m lmforge", "lmforge"])
def test_exit_status_and_traceback_from_the_real_entry_points(tmp_path, entry):
    """`python -m lmforge` and the `lmforge` script: an internal error prints its traceback and exits 1; a user
    error prints one line and exits 2 (with LMFORGE_TRACEBACK=1: its traceback, exit 1)."""
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)  # imported at start-up from PYTHONPATH
    argv = [sys.executable, "-m", "lmforge"] if entry == "python -m lmforge" else [
        str(Path(sys.executable).parent / "lmforge")]

    def lmforge(raise_: str, **env) -> subprocess.CompletedProcess:
        environ = {k: v for k, v in os.environ.items() if k != "LMFORGE_TRACEBACK"}
        environ.update(PYTHONPATH=str(tmp_path), LMFORGE_TEST_RAISE=raise_, **env)
        return subprocess.run([*argv, "info"], capture_output=True, text=True, cwd=ROOT, env=environ, timeout=120)

    for kind in ("ZeroDivisionError", "ValueError"):
        p = lmforge(f"{kind}:internal {kind}")
        assert p.returncode == 1, p.stderr
        assert p.stderr.startswith("Traceback (most recent call last):"), p.stderr
        assert p.stderr.rstrip().endswith(f"{kind}: internal {kind}") and "error:" not in p.stderr, p.stderr
    p = lmforge("UserError:train.lr: not a number")
    assert (p.returncode, p.stderr) == (2, "error: train.lr: not a number\n")
    p = lmforge("UserError:train.lr: not a number", LMFORGE_TRACEBACK="1")
    assert p.returncode == 1 and "Traceback" in p.stderr and p.stderr.rstrip().endswith("UserError: train.lr: not a number")
