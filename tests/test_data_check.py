"""`prefopt data check`: the report on real and hand-made files, its JSON form, and its exit codes."""

from __future__ import annotations

import json

import pytest

from prefopt.cli import main

HH = "\n\nHuman: {q}\n\nAssistant:"


def run_check(capsys, *args) -> tuple[int, str]:
    code = main(["data", "check", *map(str, args)])
    return code, capsys.readouterr().out


def test_hh_transcripts_report(shared_data, capsys):
    path = shared_data / "hh-harmless-train.transcript.jsonl"
    code, out = run_check(capsys, path, "--json")
    assert code == 0
    r = json.loads(out)
    assert (r["shape"], r["records"], r["examples"], r["usable"]) == ("implicit", 1424, 1424, True)
    assert 0.40 <= r["length_bias"]["chosen_longer"] <= 0.50  # HH harmless: chosen is longer in ~45 %
    assert r["token_lengths"]["prompt"]["max"] > r["token_lengths"]["prompt"]["p50"] > 0
    assert r["duplicates"] == r["chosen_equals_rejected"] == r["diverge_before_last_turn"] == 0
    code, text = run_check(capsys, path)
    assert code == 0 and "shape: implicit" in text and "length bias: chosen longer in" in text
    assert "verdict: usable" in text


def test_every_problem_is_counted(tmp_path, capsys):
    good = [{"prompt": f"Q{i}?", "chosen": f" A{i}.", "rejected": f" B{i}."} for i in range(4)]
    recs = good + [
        good[0],  # a duplicate
        {"prompt": "Q?", "chosen": " same", "rejected": " same"},  # chosen == rejected
        {"prompt": "Q?", "chosen": " ok\n\nHuman: and another thing", "rejected": " no"},  # role marker
        {"prompt": "Q " * 300, "chosen": " long prompt", "rejected": " x"},  # over max_length
        {"prompt": "Q?", "chosen": " a\x16b", "rejected": " c"},
    ]  # SmolLM2's vocabulary drops \x16
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    code, out = run_check(capsys, path, "--json", "--data.max_length", 128, "--data.max_prompt_length", 64)
    r = json.loads(out)
    assert code == 0 and r["usable"]  # warnings only
    assert (r["duplicates"], r["chosen_equals_rejected"], r["role_markers_in_responses"]) == (1, 1, 1)
    assert r["max_length"]["would_truncate"] == 1 and r["max_length"]["prompts_cut"] == 1
    assert r["examples"] == 8 and r["skipped"] == {"chosen equals rejected": 1}
    assert r["not_reproduced_by_tokenizer"] == 1 and "line 9" in r["not_reproduced_first"][0]
    code, out = run_check(
        capsys, path, "--json", "--data.max_length", 128, "--data.max_prompt_length", 64, "--data.truncation", "drop"
    )
    assert json.loads(out)["max_length"]["would_drop"] == 1


def test_implicit_problems(tmp_path, capsys):
    recs = [
        {"chosen": HH.format(q="a") + " yes", "rejected": HH.format(q="a") + " no"},
        {
            "chosen": HH.format(q="b") + " x\n\nHuman: more\n\nAssistant: y",
            "rejected": HH.format(q="b") + " z\n\nHuman: else\n\nAssistant: w",
        },
        {"chosen": HH.format(q="c") + " fine", "rejected": HH.format(q="c")},
    ]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    code, out = run_check(capsys, path, "--json")
    r = json.loads(out)
    assert code == 2 and not r["usable"]  # training would stop at line 2
    assert r["diverge_before_last_turn"] == 1 and r["empty_responses"] == 1 and r["examples"] == 1
    assert "line 2" in r["skipped_first"]["transcripts diverge before the last turn"]
    code, out = run_check(capsys, path, "--json", "--data.on_bad_record", "skip")
    r = json.loads(out)
    assert code == 0 and r["usable"] and any("skipped" in w for w in r["warnings"])


def test_unreadable_and_unusable(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, out = run_check(capsys, empty)
    assert code == 2 and "cannot read it" in out and "empty" in out and "NOT usable" in out
    code, out = run_check(capsys, tmp_path / "missing.jsonl", "--json")
    assert code == 2 and "no such file" in json.loads(out)["error"]
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"prompt": "p", "chosen": " a", "rejected": " a"}) + "\n")
    code, out = run_check(capsys, same, "--json")
    assert code == 2 and "no example is left to train on" in json.loads(out)["problems"]


def test_unpaired_report(shared_data, capsys):
    # an unpaired loss: with the default (sigmoid, paired) the data is not usable, as in training
    code, out = run_check(capsys, shared_data / "kto-en-demo.json", "--json", "--loss.name", "kto")
    r = json.loads(out)
    assert code == 0 and r["shape"] == "unpaired" and r["labels"] == {"desirable": 150, "undesirable": 150}
    assert set(r["token_lengths"]) == {"prompt", "completion"} and "length_bias" not in r


@pytest.mark.parametrize("argv", [["data"], ["data", "check"]])
def test_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
