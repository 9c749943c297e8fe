"""Reward functions: a batch of (prompt, response) texts in, one number per response out.

    reward(prompts: list[str], responses: list[str]) -> list[float]

Named by a string wherever prefopt takes a reward (`prefopt eval --reward`, frontier and
on-policy configs):

    vader                 VADER compound sentiment of the response, in [−1, 1]
    length                number of whitespace-separated words of the response
    regex:PATTERN         1.0 where the response matches PATTERN (Python re.search), else 0.0
    keywords:w1,w2,...    how many of the words occur in the response (case-insensitive, whole words)
    tests                 the built-in code task: the fraction of the problem's unit tests that the code
                          in the response passes, run in the sandbox (prefopt.tasks.code)
    tests:PROBLEMS.jsonl  the same on your problems file (prompt, tests, optional entry_point)
    tests_binary[:FILE]   1.0 when the code passes every test of its problem, else 0.0
    package.module:func   any importable function with the signature above
    path/to/file.py:func  a function defined in a Python file

The code rewards find a response's problem by its prompt: the prompt text must contain the problem's
prompt, as prefopt.tasks.code.chat_prompt makes it.

What a reward function returns is checked: one finite number per response, or a clear error.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from pathlib import Path
from typing import Callable

from prefopt.errors import PrefoptError
from prefopt.tasks import code
from prefopt.tasks.sentiment import vader_reward

RewardFn = Callable[[list, list], list]


def vader(prompts: list[str], responses: list[str]) -> list[float]:
    """VADER compound sentiment of each response (the prompt carries no preference signal)."""
    return vader_reward(responses)


def length(prompts: list[str], responses: list[str]) -> list[float]:
    """Number of whitespace-separated words of each response."""
    return [float(len(r.split())) for r in responses]


def regex(pattern: str) -> RewardFn:
    """A reward of 1.0 where the response matches `pattern` (re.search), else 0.0."""
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise PrefoptError(f"reward 'regex:{pattern}': not a valid regular expression ({e}).") from None

    def reward(prompts, responses):
        """1.0 for each response that matches the pattern, else 0.0."""
        return [1.0 if compiled.search(r) else 0.0 for r in responses]

    return reward


def keywords(words: str) -> RewardFn:
    """A reward counting how many of the comma-separated `words` occur in the response (whole
    words, case-insensitive)."""
    found = [w.strip() for w in words.split(",") if w.strip()]
    if not found:
        raise PrefoptError("reward 'keywords:': give the words, comma-separated (keywords:great,superb).")
    patterns = [re.compile(rf"\b{re.escape(w)}\b", re.IGNORECASE) for w in found]

    def reward(prompts, responses):
        """How many of the words occur in each response."""
        return [float(sum(1 for p in patterns if p.search(r))) for r in responses]

    return reward


def tests(path: str = "", binary: bool = False) -> RewardFn:
    """The code reward on the built-in problems (`path` empty) or a problems file: the fraction of
    the problem's tests the response's code passes (with `binary`: 1.0 only when all pass)."""
    problems = code.load_problems(path) if path else code.problems()
    return code.reward(problems, binary=binary)


def tests_binary(path: str = "") -> RewardFn:
    """The code reward scoring 1.0 only when every test passes."""
    return tests(path, binary=True)


BUILTIN = {"vader": vader, "length": length}
FACTORIES = {"regex": regex, "keywords": keywords, "tests": tests, "tests_binary": tests_binary}


def _import(spec: str) -> RewardFn:
    where, _, name = spec.rpartition(":")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise PrefoptError(f"reward '{spec}': file {where} not found.")
            module_spec = importlib.util.spec_from_file_location(f"prefopt_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ImportError as e:
        raise PrefoptError(f"reward '{spec}': cannot import '{where}' ({e}).") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise PrefoptError(f"reward '{spec}': '{where}' has no function '{name}'.")
    return fn


def get(spec: str) -> RewardFn:
    """The reward function named by `spec` (see the module docstring), wrapped with checks."""
    if not isinstance(spec, str) or not spec:
        raise PrefoptError(
            f"reward: expected a name such as vader, length, regex:..., keywords:..., or "
            f"module:function, found {spec!r}."
        )
    if spec in BUILTIN:
        fn = BUILTIN[spec]
    elif spec.split(":", 1)[0] in FACTORIES:
        kind, _, arg = spec.partition(":")
        fn = FACTORIES[kind](arg)
    elif ":" in spec:
        fn = _import(spec)
    else:
        raise PrefoptError(
            f"reward '{spec}': unknown; built-ins are {', '.join(BUILTIN)}, "
            f"{', '.join(k + ':...' for k in FACTORIES)}, or name a function as module:function "
            "or path/to/file.py:function."
        )
    return checked(fn, spec)


def checked(fn: RewardFn, name: str) -> RewardFn:
    """`fn` wrapped so that anything but one finite number per response raises a PrefoptError."""

    def reward(prompts: list[str], responses: list[str]) -> list[float]:
        """The values of `fn` as floats, checked."""
        values = fn(list(prompts), list(responses))
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise PrefoptError(
                f"reward '{name}': must return one number per response; returned "
                f"{type(values).__name__} {str(values)[:80]}"
            ) from None
        if len(values) != len(responses):
            raise PrefoptError(f"reward '{name}': returned {len(values)} values for {len(responses)} responses.")
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            raise PrefoptError(
                f"reward '{name}': value {values[bad]} for response {bad} ({responses[bad][:60]!r}) is not finite."
            )
        return values

    reward.__name__ = f"reward[{name}]"
    return reward
