"""The code task: small Python function-writing problems, scored by running their unit tests in the
sandbox (prefopt.evaluation.sandbox).

The built-in problems (code_problems.jsonl, written for this project) each give a signature and a
docstring; the model is asked, through its chat template, to write the function; the reward is the
fraction of the problem's 3-6 assert tests its answer passes. They are split by problem, fixed in
the file: "train" and "heldout" (every third problem in file order). Each keeps a reference solution
(`solution`), never shown to the model; the tests check that every one passes.

    problems("heldout")                       # the built-in problems of a split
    load_problems("my_problems.jsonl")        # yours: {"prompt", "tests", "entry_point"?} per line
    chat_prompt(problem, tokenizer)           # the text the model continues
    score(problems, answers)                  # sandbox Results, one per (problem, answer)
    reward(problems)                          # a reward function (prompts, responses) -> scores

A problems file is JSONL, one problem per line: `prompt` (a non-empty string: a Python signature
with its docstring, or a task in words), `tests` (a non-empty list of Python sources, each counted
as one test: an assert statement or a small block), and optionally `entry_point` (the function the
answer must define), `id`, `solution` (a reference solution) and `split` ("train" or "heldout").
Other fields are ignored. A malformed line is an error naming the file, the line and the field.
"""

from __future__ import annotations

import ast
import difflib
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable, Optional, Sequence

from prefopt.errors import PrefoptError
from prefopt.evaluation import sandbox

PROBLEMS_FILE = "code_problems.jsonl"
SPLITS = ("train", "heldout")
FIELDS = ("prompt", "tests", "entry_point", "id", "solution", "split")
ASK = "that matches this signature and docstring"
REPLY = "Reply with the complete function in a Python code block."


@dataclass(frozen=True)
class Problem:
    """One function-writing problem: what the model is shown (`prompt`), how an answer is checked
    (`tests`, `entry_point`), and where it comes from."""

    prompt: str
    tests: tuple
    entry_point: Optional[str] = None
    id: str = ""
    solution: Optional[str] = None  # a reference solution; never part of the prompt
    split: Optional[str] = None
    where: str = ""  # "FILE line N"


def problems(split: Optional[str] = None) -> list[Problem]:
    """The built-in problems: all of them, or those of `split` ("train" or "heldout")."""
    if split is not None and split not in SPLITS:
        raise PrefoptError(f"code task: split must be one of {', '.join(SPLITS)}, found {split!r}.")
    return [p for p in _builtin() if split is None or p.split == split]


@lru_cache(maxsize=1)
def _builtin() -> tuple:
    """The built-in problems, read once."""
    with resources.as_file(resources.files("prefopt.tasks").joinpath(PROBLEMS_FILE)) as path:
        return tuple(load_problems(path))


def load_problems(path) -> list[Problem]:
    """The problems of a JSONL file (see the module docstring), checked: a malformed line raises a
    PrefoptError naming the file, the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise PrefoptError(f"{path}: problems file not found.")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise PrefoptError(f"{path}: not UTF-8 text (byte {e.start}); expected JSONL, one problem per line.") from None
    found, seen = [], {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        problem = _problem(_record(line, where), where, lineno)
        if problem.prompt in seen:
            raise PrefoptError(f"{where}: field 'prompt': the same prompt as line {seen[problem.prompt]}.")
        seen[problem.prompt] = lineno
        found.append(problem)
    if not found:
        raise PrefoptError(f"{path}: the file holds no problems.")
    return found


def _record(line: str, where: str) -> dict:
    """One JSONL line as a dict, or a PrefoptError."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise PrefoptError(f"{where} column {e.colno}: invalid JSON: {e.msg}.") from None
    except RecursionError:
        raise PrefoptError(f"{where}: invalid record: nested too deeply.") from None
    if not isinstance(record, dict):
        raise PrefoptError(f"{where}: expected a JSON object with fields prompt, tests, found {type(record).__name__}.")
    return record


def _problem(record: dict, where: str, lineno: int) -> Problem:
    """A Problem from a record, each field checked."""
    for key in record:
        near = difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.75)
        if key not in FIELDS and near:
            raise PrefoptError(f"{where}: field '{key}' is not known; did you mean '{near[0]}'?")

    def bad(name: str, expected: str):
        found = record.get(name)
        shown = "nothing" if name not in record else f"{type(found).__name__} {json.dumps(found)[:60]}"
        return PrefoptError(f"{where}: field '{name}': expected {expected}, found {shown}.")

    prompt, tests = record.get("prompt"), record.get("tests")
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad("prompt", "a non-empty string (a signature with its docstring, or the task in words)")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) and t.strip() for t in tests):
        raise bad("tests", 'a non-empty list of Python sources (strings), e.g. ["assert add(1, 2) == 3"]')
    for i, test in enumerate(tests, 1):
        try:
            compile(test, f"test {i}", "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as e:
            raise PrefoptError(
                f"{where}: field 'tests': test {i} is not valid Python ({getattr(e, 'msg', e)})."
            ) from None
    entry = record.get("entry_point")
    if entry is not None and not (isinstance(entry, str) and entry.isidentifier()):
        raise bad("entry_point", "the name of a Python function")
    split = record.get("split")
    if split is not None and split not in SPLITS:
        raise bad("split", " or ".join(f'"{s}"' for s in SPLITS))
    for name in ("id", "solution"):
        if record.get(name) is not None and not isinstance(record[name], str):
            raise bad(name, "a string")
    ident = record.get("id") or f"line {lineno}"
    return Problem(prompt, tuple(tests), entry, ident, record.get("solution"), split, where)


# ----------------------------------------------------------------------------------------------
# Prompts


def instruction(problem: Problem) -> str:
    """The user message asking for the function. A prompt that is Python (a signature with its
    docstring) is shown in a code block:

        Write a Python function `add` that matches this signature and docstring:

        ```python
        def add(a: int, b: int) -> int:
            \"\"\"Return the sum of a and b.\"\"\"
        ```

        Reply with the complete function in a Python code block.

    A prompt in words is kept as it is, followed by the last line."""
    if _is_python(problem.prompt):
        name = f" `{problem.entry_point}`" if problem.entry_point else ""
        stub = problem.prompt.rstrip("\n")
        return f"Write a Python function{name} {ASK}:\n\n```python\n{stub}\n```\n\n{REPLY}"
    return f"{problem.prompt.rstrip()}\n\n{REPLY}"


def _is_python(text: str) -> bool:
    """Whether `text` parses as Python and defines something (a stub, not a sentence)."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) for node in tree.body)


def chat_prompt(problem: Problem, tokenizer) -> str:
    """The text the model continues: the instruction as a user turn through the tokenizer's chat
    template, with the generation prompt (the bare instruction for a tokenizer without a template)."""
    message = instruction(problem)
    if getattr(tokenizer, "chat_template", None) is None:
        return message
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
    )


# ----------------------------------------------------------------------------------------------
# Scoring


def score(
    problems: Sequence[Problem],
    answers: Sequence[str],
    *,
    extract: bool = True,
    workers: Optional[int] = None,
    **limits,
) -> list:
    """The sandbox Result of each answer against its problem (answers[i] answers problems[i]).
    `extract`: take the code out of a chat answer first (sandbox.extract_code); `limits`: any
    sandbox Limits field."""
    if len(problems) != len(answers):
        raise PrefoptError(f"code task: {len(answers)} answers for {len(problems)} problems.")
    items = [
        (sandbox.extract_code(a) if extract else a, list(p.tests), p.entry_point) for p, a in zip(problems, answers)
    ]
    return sandbox.score_many(items, workers=workers, **limits)


def reward(problems: Sequence[Problem], *, binary: bool = False, workers: Optional[int] = None, **limits) -> Callable:
    """A reward function `(prompts, responses) -> list[float]` (prefopt.evaluation.rewards): each
    response's score on the problem whose prompt its prompt contains (as chat_prompt makes it) —
    the fraction of tests passed, or with `binary` 1.0 only when all pass. The responses of a batch
    run in parallel over the cores."""
    sandbox.Limits(**limits)  # a bad limit is an error now, not at the first batch
    find = _finder(problems)

    def tests_reward(prompts: list[str], responses: list[str]) -> list[float]:
        """The score of each response on its prompt's problem."""
        results = score([find(p) for p in prompts], responses, workers=workers, **limits)
        return [r.binary if binary else r.score for r in results]

    return tests_reward


def _finder(problems: Sequence[Problem]) -> Callable[[str], Problem]:
    """A function from a prompt text to the problem whose prompt it contains (the longest such, if
    several do), remembered per text; a text containing none is a PrefoptError."""
    ordered = sorted(((p.prompt.strip(), p) for p in problems), key=lambda kp: len(kp[0]), reverse=True)
    known: dict = {}

    def find(text: str) -> Problem:
        if text not in known:
            match = next((p for key, p in ordered if key in text), None)
            if match is None:
                raise PrefoptError(
                    f"reward 'tests': the prompt {text[:80]!r}... contains no problem's prompt; the code reward "
                    "scores prompts made from its problems (prefopt.tasks.code.chat_prompt)."
                )
            known[text] = match
        return known[text]

    return find
