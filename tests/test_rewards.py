"""Reward functions by name: built-ins, rules, user functions, and clear errors for bad ones."""

from __future__ import annotations

import pytest

from prefopt.errors import PrefoptError
from prefopt.evaluation import rewards

P = ["x", "x", "x"]


def test_builtins_and_rules():
    assert rewards.get("length")(P, ["one two", "", "a b c"]) == [2.0, 0.0, 3.0]
    v = rewards.get("vader")(P, ["A wonderful, moving film.", "Dull and awful.", "It is a film."])
    assert v[0] > 0.5 and v[1] < -0.3 and v[2] == 0.0
    assert rewards.get(r"regex:\d+ stars")(P, ["5 stars!", "five stars", "10 stars"]) == [1.0, 0.0, 1.0]
    assert rewards.get("keywords:great, superb")(P, ["Great and superb", "greatest", "SUPERB"]) == [2.0, 0.0, 1.0]


def test_user_function_from_a_file_and_a_module(tmp_path, monkeypatch):
    f = tmp_path / "my_reward.py"
    f.write_text(
        "def exclaim(prompts, responses):\n    return [r.count('!') for r in responses]\n"
        "def broken(prompts, responses):\n    return [1.0]\n"
        "def nan(prompts, responses):\n    return [float('nan')] * len(responses)\n"
    )
    assert rewards.get(f"{f}:exclaim")(P, ["a!", "b!!", "c"]) == [1.0, 2.0, 0.0]
    monkeypatch.syspath_prepend(str(tmp_path))
    assert rewards.get("my_reward:exclaim")(P, ["!", "", "!!!"]) == [1.0, 0.0, 3.0]
    with pytest.raises(PrefoptError, match="returned 1 values for 3 responses"):
        rewards.get("my_reward:broken")(P, ["a", "b", "c"])
    with pytest.raises(PrefoptError, match="not finite"):
        rewards.get("my_reward:nan")(P, ["a", "b", "c"])


@pytest.mark.parametrize(
    "spec, message",
    [
        ("sentiment", "unknown; built-ins are vader, length"),
        ("regex:(", "not a valid regular expression"),
        ("keywords:", "give the words"),
        ("no_such_module_xyz:f", "cannot import"),
        ("prefopt.evaluation.rewards:absent", "has no function 'absent'"),
        ("/nonexistent/r.py:f", "not found"),
    ],
)
def test_bad_reward_names_are_clear_errors(spec, message):
    with pytest.raises(PrefoptError, match=message):
        rewards.get(spec)
