"""Reward functions for GRPO and PPO: built-in GSM8K checks, and user functions named module:function or path.py:function.

A reward function has TRL's signature: `f(prompts, completions, **columns) -> list[float | None]`, one
value per completion, where `columns` are the prompt records' other fields, one list entry per
completion (GSM8K's `answer`, for example). None means "does not apply" and counts as 0 in the sum.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import re
from pathlib import Path
from typing import Callable

from lmforge.errors import UserError

RewardFn = Callable[..., list]

# The last number in a text, as lm-eval's gsm8k "flexible-extract" filter finds it (commas and $ allowed).
NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")


def _clean(number: str) -> str:
    return number.replace(",", "").replace("$", "").rstrip(".")


def flexible_answer(text: str) -> str | None:
    """The last number in `text` (lm-eval's flexible-extract), cleaned; None when there is none."""
    found = NUMBER.findall(text)
    if not found:
        return None
    a, b = found[-1]
    return _clean(a or b)


def strict_answer(text: str) -> str | None:
    """The number after the first `#### ` (lm-eval's strict-match), cleaned; None when there is none."""
    m = STRICT.search(text)
    return _clean(m.group(1)) if m else None


def reference_answer(answer: str) -> str:
    """GSM8K's gold number: what follows `####` in the `answer` field."""
    return _clean(answer.split("####")[-1].strip())


def _same(a: str | None, b: str) -> bool:
    if a is None:
        return False
    try:
        return math.isclose(float(a), float(b))
    except ValueError:
        return a == b


def gsm8k(prompts: list, completions: list[str], answer: list[str] | None = None, **_) -> list[float | None]:
    """1.0 when the completion's last number equals the gold answer (flexible extraction), else 0.0."""
    if answer is None:
        return [None] * len(completions)
    return [float(_same(flexible_answer(c), reference_answer(a))) for c, a in zip(completions, answer)]


def gsm8k_strict(prompts: list, completions: list[str], answer: list[str] | None = None, **_) -> list[float | None]:
    """1.0 when the number after `####` equals the gold answer (strict extraction), else 0.0."""
    if answer is None:
        return [None] * len(completions)
    return [float(_same(strict_answer(c), reference_answer(a))) for c, a in zip(completions, answer)]


FORMAT = re.compile(r"####\s*-?[$0-9.,]*[0-9][$0-9.,]*\s*$")


def gsm8k_format(prompts: list, completions: list[str], **_) -> list[float]:
    """1.0 when the completion ends its answer as `#### N`, else 0.0."""
    return [float(bool(FORMAT.search(c.strip()))) for c in completions]


BUILTIN: dict[str, RewardFn] = {"gsm8k": gsm8k, "gsm8k_strict": gsm8k_strict, "gsm8k_format": gsm8k_format}


def load_reward_function(name: str) -> RewardFn:
    """A built-in name, `package.module:function`, or `path/to/file.py:function`; a UserError saying what failed."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise UserError(f"reward function {name!r}: not built in ({', '.join(BUILTIN)}) and not of the form "
                         "module:function or path.py:function")
    where, attr = name.rsplit(":", 1)
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise UserError(f"{path} does not exist")
            spec = importlib.util.spec_from_file_location(f"lmforge_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ValueError as e:
        raise UserError(f"reward function {name!r}: {e}") from None
    except Exception as e:  # noqa: BLE001 - the user's module may raise anything while importing
        raise UserError(f"reward function {name!r}: cannot import {where}: {type(e).__name__}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"reward function {name!r}: {where} has no function {attr!r}")
    return fn


def score(fns: dict[str, RewardFn], prompts: list[str], completions: list[str], columns: dict[str, list]
          ) -> dict[str, list[float]]:
    """Each function's rewards for the completions (None -> nan); a function that raises or returns the wrong
    number of values is an error naming it."""
    out = {}
    for name, fn in fns.items():
        try:
            values = fn(prompts=prompts, completions=completions, **columns)
        except Exception as e:  # noqa: BLE001 - user code
            raise RuntimeError(f"reward function {name} raised {type(e).__name__}: {e}") from e
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            raise RuntimeError(f"reward function {name} returned {type(values).__name__} "
                               f"{'of length ' + str(len(values)) if hasattr(values, '__len__') else ''}; expected "
                               f"a list of {len(completions)} numbers")
        out[name] = [math.nan if v is None else float(v) for v in values]
    return out
