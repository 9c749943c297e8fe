"""The code task: the built-in problems (their split, their reference solutions, tests that tell a
wrong answer apart), a user's problems file and its errors, the prompt, and the `tests` reward."""

from __future__ import annotations

import ast
import json
import re
import sys
import time

import pytest

from prefopt.errors import PrefoptError
from prefopt.evaluation import rewards, sandbox
from prefopt.tasks import code

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is for Linux")


def test_builtin_problems_and_their_split():
    every = code.problems()
    train, heldout = code.problems("train"), code.problems("heldout")
    assert len(every) >= 150 and (len(train), len(heldout)) == (129, 64)
    assert [p.id for p in heldout] == [p.id for i, p in enumerate(every) if i % 3 == 2]  # the rule, fixed in the file
    assert {p.id for p in train}.isdisjoint({p.id for p in heldout})
    assert len({p.id for p in every}) == len({p.prompt for p in every}) == len(every)
    for p in every:
        assert 3 <= len(p.tests) <= 6, p.id
        assert p.entry_point == p.id and p.solution
        stub = ast.parse(p.prompt).body
        assert [type(n) for n in stub] == [ast.FunctionDef] and stub[0].name == p.entry_point, p.id
        assert ast.get_docstring(stub[0]), p.id
        assert len(stub[0].body) == 1 and p.solution not in code.instruction(p)  # the docstring only
    with pytest.raises(PrefoptError, match="split must be one of train, heldout"):
        code.problems("test")


@linux
def test_every_reference_solution_passes_and_a_wrong_answer_fails():
    every = code.problems()
    wrong = [f"def {p.entry_point}(*args, **kwargs):\n    return None\n" for p in every]
    t0 = time.monotonic()
    results = code.score(every + every, [p.solution for p in every] + wrong, extract=False)
    assert time.monotonic() - t0 < 90
    right, wrong = results[: len(every)], results[len(every) :]
    assert [p.id for p, r in zip(every, right) if r.binary != 1.0] == []
    assert [p.id for p, r in zip(every, wrong) if r.binary != 0.0] == []  # no test set is vacuous


def test_the_prompt_asks_for_the_function_in_a_code_block(smol_tokenizer):
    add = code.problems()[0]
    text = code.instruction(add)
    assert text.startswith("Write a Python function `add` that matches this signature and docstring:")
    assert f"```python\n{add.prompt}```" in text and text.endswith(code.REPLY)
    chat = code.chat_prompt(add, smol_tokenizer)
    assert text in chat and chat.endswith("<|im_start|>assistant\n")
    words = code.Problem("Write a function `double(n)` that returns twice n.", ("assert double(2) == 4",))
    assert code.instruction(words) == f"{words.prompt}\n\n{code.REPLY}"


def write(tmp_path, lines, name="problems.jsonl"):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


F = "def f(): pass"
GOOD = {"prompt": "def add(a, b):\n    '''Sum.'''\n", "tests": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]}


def test_a_users_problems_file(tmp_path):
    words = {"prompt": "Write `neg(x)`: minus x.", "tests": ["assert neg(1) == -1"], "entry_point": "neg"}
    path = write(tmp_path, [GOOD, "", {**words, "difficulty": "easy"}])  # other fields are ignored
    first, second = code.load_problems(path)
    assert (first.id, first.entry_point, first.tests) == ("line 1", None, tuple(GOOD["tests"]))
    assert first.where == f"{path} line 1"
    assert (second.id, second.entry_point, second.where) == ("line 3", "neg", f"{path} line 3")


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "line 2 column 2: invalid JSON"),
        ("[1, 2]", "line 2: expected a JSON object with fields prompt, tests, found list"),
        ({"tests": ["assert 1"]}, "line 2: field 'prompt': expected a non-empty string"),
        ({"prompt": " ", "tests": ["assert 1"]}, "line 2: field 'prompt': expected a non-empty string"),
        (
            {"prompt": F, "tests": "assert f() is None"},
            "line 2: field 'tests': expected a non-empty list",
        ),
        ({"prompt": F, "tests": []}, "line 2: field 'tests': expected a non-empty list"),
        (
            {"prompt": F, "tests": ["assert f() is None", "assert ("]},
            "line 2: field 'tests': test 2 is not",
        ),
        ({"prompt": F, "tests": ["assert 1"], "entry_point": "f()"}, "line 2: field 'entry_point'"),
        ({"prompt": F, "tests": ["assert 1"], "split": "test"}, "line 2: field 'split': expected"),
        ({"prompt": F, "test": ["assert 1"]}, "line 2: field 'test' is not known; did you mean 'tests'"),
        ({"prompt": F, "tests": ["assert 1"], "entrypoint": "f"}, "did you mean 'entry_point'"),
        (GOOD, "line 2: field 'prompt': the same prompt as line 1"),
    ],
)
def test_a_malformed_problems_file_names_file_line_and_field(tmp_path, line, message):
    path = write(tmp_path, [GOOD, line])
    with pytest.raises(PrefoptError, match=re.escape(str(path))) as e:
        code.load_problems(path)
    assert message in str(e.value)
    with pytest.raises(PrefoptError, match="line 2"):  # the same error through the reward's name
        rewards.get(f"tests:{path}")


def test_missing_and_empty_problems_files(tmp_path):
    with pytest.raises(PrefoptError, match="problems file not found"):
        code.load_problems(tmp_path / "absent.jsonl")
    with pytest.raises(PrefoptError, match="holds no problems"):
        code.load_problems(write(tmp_path, ["", "  "]))


@linux
def test_the_tests_reward_finds_the_problem_by_its_prompt(tmp_path, smol_tokenizer):
    add, subtract = code.problems()[:2]
    prompts = [code.chat_prompt(p, smol_tokenizer) for p in (add, subtract, add, add)]
    answers = [
        f"Sure:\n```python\n{add.solution}```\nIt adds.",
        "```python\ndef subtract(a, b):\n    return b - a\n```",  # passes 1 of 3 (0 - 0)
        "I cannot help with that.",
        "```python\ndef add(a, b):\n    return a + b if a != 100 else 0\n```",  # fails 1 of its 4 tests
    ]
    assert rewards.get("tests")(prompts, answers) == [1.0, pytest.approx(1 / 3), 0.0, 0.75]
    assert rewards.get("tests_binary")(prompts, answers) == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(PrefoptError, match="contains no problem's prompt"):
        rewards.get("tests")(["Write a poem."], ["roses"])
    path = write(tmp_path, [GOOD])
    mine = code.load_problems(path)[0]
    assert rewards.get(f"tests:{path}")([code.chat_prompt(mine, smol_tokenizer)], ["def add(a, b): return a + b"]) == [
        1.0
    ]


@linux
def test_score_extracts_the_code_and_checks_lengths():
    add = code.problems()[0]
    results = code.score([add, add], ["```python\n" + add.solution + "```", "```\nprint('no')\n```"])
    assert [r.score for r in results] == [1.0, 0.0] and results[1].reason == "no function 'add'"
    assert isinstance(results[0], sandbox.Result)
    with pytest.raises(PrefoptError, match="1 answers for 2 problems"):
        code.score([add, add], ["x"])
