"""Bad input, case by case: each malformed file gives one line naming the file, the line or record,
the field, what was expected and what was found. (More cases: test_formats.py.) With
data.on_bad_record = skip, bad records are skipped and counted by reason, never silently."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from prefopt.data.formats import Options, load, load_pairs
from prefopt.errors import PrefoptError

GOOD = {"prompt": "Hi?", "chosen": " Hello.", "rejected": " Go away."}
U, A, S = "user", "assistant", "system"


def msg(role, content):
    return {"role": role, "content": content}


def conv(prompt, chosen="Hello.", rejected="What?"):
    return {"prompt": prompt, "chosen": [msg(A, chosen)], "rejected": [msg(A, rejected)]}


def sharegpt(conversations, chosen=None, rejected=None):
    return {
        "conversations": conversations,
        "chosen": chosen or {"from": "gpt", "value": "Yes."},
        "rejected": rejected or {"from": "gpt", "value": "No."},
    }


HH = "\n\nHuman: Hi there\n\nAssistant:"

# name -> (the bad record written as line 2 of a JSONL file after one good record of the same
#          shape (None: the good record alone is first), fragments the message must contain)
CASES = {
    "label is a string": (
        {"prompt": "p", "completion": " c", "label": "yes"},
        ["field 'label'", "expected true or false", "'yes'"],
    ),
    "label is null": ({"prompt": "p", "completion": " c", "label": None}, ["field 'label'", "null"]),
    "label is a number": ({"prompt": "p", "completion": " c", "label": 1}, ["field 'label'", "int"]),
    "unpaired completion empty": ({"prompt": "p", "completion": "  ", "label": True}, ["field 'completion'", "empty"]),
    "unpaired without prompt": ({"completion": " c", "label": True}, ["missing field 'prompt'"]),
    "unpaired messages without a prompt turn": (
        {"messages": [msg(A, "x")], "label": False},
        ["field 'messages'", "prompt turn"],
    ),
    "unpaired messages ending with user": (
        {"messages": [msg(U, "x"), msg(A, "y"), msg(U, "z")], "label": True},
        ["field 'messages'", "last message", "'assistant'", "'user'"],
    ),
    "two user turns in a row": (conv([msg(U, "a"), msg(U, "b")]), ["field 'prompt[1].role'", "two 'user' turns"]),
    "system turn in the middle": (
        conv([msg(U, "a"), msg(A, "b"), msg(S, "c"), msg(U, "d")]),
        ["field 'prompt[2].role'", "system message"],
    ),
    "prompt ends with assistant": (conv([msg(U, "a"), msg(A, "b")]), ["field 'prompt'", "end with a user"]),
    "message without content": (conv([{"role": U}]), ["field 'prompt[0]'", '"content"', "dict"]),
    "message content is a list": (conv([msg(U, ["a"])]), ["field 'prompt[0].content'", "expected a string", "list"]),
    "conversational prompt is a string": (conv("Hi"), ["field 'prompt'", "list of messages", "a string"]),
    "response starts with a user turn": (
        {"prompt": [msg(U, "a")], "chosen": [msg(U, "b"), msg(A, "c")], "rejected": [msg(A, "d")]},
        ["field 'chosen[0].role'", "assistant"],
    ),
    "sharegpt unknown speaker": (
        sharegpt([{"from": "bot", "value": "hi"}]),
        ["field 'conversations[0].from'", "unknown speaker 'bot'", "human"],
    ),
    "sharegpt chosen is a string": (
        sharegpt([{"from": "human", "value": "hi"}], chosen="Yes."),
        ["field 'chosen'", "ShareGPT message", "a string"],
    ),
    "sharegpt value not a string": (
        sharegpt([{"from": "human", "value": 7}]),
        ["field 'conversations[0].value'", "expected a string", "int"],
    ),
    "sharegpt message without value": (sharegpt([{"from": "human"}]), ["field 'conversations[0]'", '"value"']),
    "sharegpt prompt ends with gpt": (
        sharegpt([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]),
        ["field 'conversations'", "end with a user"],
    ),
    "transcripts diverge before the last turn": (
        {"chosen": HH + " A\n\nHuman: more\n\nAssistant: B", "rejected": HH + " C\n\nHuman: other\n\nAssistant: D"},
        ["diverge before the last turn", "'Human:'"],
    ),
    "transcripts share no turn boundary": (
        {"chosen": "Once upon a time", "rejected": "Twice"},
        ["no prefix ending at a turn boundary", "Assistant:"],
    ),
    "implicit response empty": ({"chosen": HH + " fine", "rejected": HH}, ["field 'rejected'", "empty"]),
    "implicit conversations differ early": (
        {
            "chosen": [msg(U, "a"), msg(A, "b"), msg(U, "c"), msg(A, "d")],
            "rejected": [msg(U, "a"), msg(A, "x"), msg(U, "c"), msg(A, "d")],
        },
        ["differ at message 1", "before their last turn"],
    ),
    "implicit conversation response empty": (
        {"chosen": [msg(U, "a"), msg(A, " ")], "rejected": [msg(U, "a"), msg(A, "d")]},
        ["field 'chosen[0].content'", "empty"],
    ),
    "ratings score not a number": (
        {"prompt": "p", "completions": [{"response": "a", "score": "high"}, {"response": "b", "score": 1}]},
        ["field 'completions[0].score'", "expected a number", "'high'"],
    ),
    "ratings score is a boolean": (
        {"prompt": "p", "completions": [{"response": "a", "score": True}, {"response": "b", "score": 1}]},
        ["field 'completions[0].score'", "boolean"],
    ),
    "ratings one completion": (
        {"prompt": "p", "completions": [{"response": "a", "score": 1}]},
        ["field 'completions'", "at least two"],
    ),
    "ratings completion without score": (
        {"prompt": "p", "completions": [{"response": "a"}, {"text": "b", "score": 2}]},
        ["field 'completions[0]'", "one of score", "response"],
    ),
    "ratings lists of different length": (
        {"prompt": "p", "responses": ["a", "b"], "scores": [1]},
        ["field 'scores'", "same length"],
    ),
    "record is null": (None, ["expected a record", "null"]),
    "record is a number": (5, ["expected a record", "int"]),
    "no known fields": ({"question": "q", "answer": "a"}, ["missing fields", "'prompt'", "question, answer"]),
    "response is a number": (
        {"prompt": "p", "chosen": " y", "rejected": 3.5},
        ["field 'rejected'", "expected a string", "float"],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_record(tmp_path, name):
    bad, fragments = CASES[name]
    path = tmp_path / "data.jsonl"
    first = GOOD
    if isinstance(bad, dict):  # a good record of the same shape first, so the bad one is line 2
        if "label" in bad:
            first = {"prompt": "p", "completion": " ok", "label": True}
        elif "conversations" in bad:
            first = sharegpt([{"from": "human", "value": "hi"}])
        elif "completions" in bad or "responses" in bad:
            first = {"prompt": "p", "responses": ["a", "b"], "scores": [2, 1]}
        elif "prompt" not in bad and "chosen" in bad:
            first = {"chosen": HH + " yes", "rejected": HH + " no"}
        elif isinstance(bad.get("chosen"), list):
            first = conv([msg(U, "ok")])
    path.write_text(json.dumps(first) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(PrefoptError) as info:
        load_pairs(str(path))
    text = str(info.value)
    assert f"{path} line 2" in text, text
    for frag in fragments:
        assert frag in text, f"{frag!r} not in: {text}"
    assert "\n" not in text


def one_line_error(path: Path, *fragments, **kw):
    with pytest.raises(PrefoptError) as info:
        load_pairs(str(path), **kw)
    text = str(info.value)
    for frag in fragments:
        assert frag in text, f"{frag!r} not in: {text}"
    return text


def test_binary_junk(tmp_path):
    junk = bytes(range(256)) * 40
    for suffix, frags in (
        (".jsonl", ["line 1", "binary data"]),
        (".json", ["not UTF-8"]),
        (".csv", ["not UTF-8"]),
        (".parquet", ["not a readable Parquet file"]),
    ):
        path = tmp_path / f"junk{suffix}"
        path.write_bytes(junk)
        one_line_error(path, str(path), *frags)


def test_fifty_megabyte_single_line(tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"prompt": "' + b"a" * (50 << 20) + b'"}')
    assert os.path.getsize(path) > 50 << 20
    one_line_error(path, f"{path} line 1", "longer than 16 MiB", "one JSON record per line")


def test_trailing_garbage_after_json(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + " x\n")
    one_line_error(path, f"{path} line 1", "invalid JSON", "column")


def test_json_top_level_not_an_array(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('"just a string"')
    one_line_error(path, str(path), "JSON array", "a string")
    path.write_text('{"data": 5}')
    one_line_error(path, str(path), "JSON array", "dict")


def test_csv_cases(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,chosen,rejected\nHi?, Hello., Go away.\nonly,two\n")
    one_line_error(path, f"{path} line 3", "2 cells", "3 fields")
    path.write_text("prompt,chosen,rejected\n")
    one_line_error(path, str(path), "no records", "header")
    path.write_text("prompt,completion,label\np, ok,true\np, bad,maybe\n")
    one_line_error(path, f"{path} line 3", "field 'label'", "'maybe'")


def test_field_mapping_names_the_missing_field(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(
        json.dumps({"question": "q", "good": " a", "bad": " b"})
        + "\n"
        + json.dumps({"question": "q", "good": " a"})
        + "\n"
    )
    fields = {"question": "prompt", "good": "chosen", "bad": "rejected"}
    pairs, shape = load_pairs(str(path), limit=1, options=Options(fields=fields))
    assert shape == "standard" and pairs[0].chosen == " a"
    one_line_error(
        path, f"{path} line 2", "missing field 'bad'", "renames it to 'rejected'", options=Options(fields=fields)
    )


def test_unknown_shape_option(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n")
    one_line_error(path, "data.shape", "'pairs'", options=Options(shape="pairs"))
    one_line_error(
        path, f"{path} line 1", "standard", "earlier records are sharegpt", options=Options(shape="sharegpt")
    )


def test_skip_counts_every_bad_record_by_reason(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [
        json.dumps(GOOD),
        "{not json",
        json.dumps({"prompt": "p", "chosen": 1, "rejected": " r"}),
        json.dumps({"prompt": "p", "chosen": " same", "rejected": " same"}),
        json.dumps(GOOD),
        json.dumps({"prompt": "p", "chosen": " ", "rejected": " r"}),
        "[1, 2]",
    ]
    path.write_text("\n".join(lines) + "\n")
    loaded = load(str(path), options=Options(on_bad_record="skip"))
    assert loaded.records == 7 and len(loaded.items) == 2
    assert dict(loaded.skipped) == {
        "invalid JSON": 1,
        "wrong type": 1,
        "chosen equals rejected": 1,
        "empty response": 1,
        "not a record": 1,
    }
    assert f"{path} line 2" in loaded.examples["invalid JSON"]
    assert "skipped: " in loaded.report()
    # the same file without skip stops at line 2, and says how to skip
    one_line_error(path, f"{path} line 2", "invalid JSON", "on_bad_record")


def test_chosen_equals_rejected_is_skipped_and_counted_even_by_default(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({"prompt": "p", "chosen": " x", "rejected": " x"}) + "\n")
    loaded = load(str(path))
    assert len(loaded.items) == 1 and loaded.skipped["chosen equals rejected"] == 1
    # the same for every shape, e.g. two identical implicit-prompt conversations
    same = [msg(U, "a"), msg(A, "b")]
    path.write_text(
        json.dumps({"chosen": same, "rejected": [msg(U, "a"), msg(A, "c")]})
        + "\n"
        + json.dumps({"chosen": same, "rejected": same})
        + "\n"
    )
    loaded = load(str(path))
    assert len(loaded.items) == 1 and dict(loaded.skipped) == {"chosen equals rejected": 1}
