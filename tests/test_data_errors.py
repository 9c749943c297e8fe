"""Data that used to end in a traceback: JSON nested deeper than Python's parser allows (JSONL line,
JSON file, CSV cell), records nested deep but parseable, and `prefopt data check` judging the data
against the config's loss (paired vs unpaired) as training does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefopt.cli import main
from prefopt.data.formats import MAX_DEPTH, Options, _describe, load
from prefopt.errors import PrefoptError

GOOD = {"prompt": "Hi?", "chosen": " Hello.", "rejected": " Go away."}
UNPAIRED = [{"prompt": f"Q{i}?", "completion": f" {i}.", "label": i % 2 == 0} for i in range(4)]
PARSER_LIMIT = "nested deeper than Python's JSON parser allows"
DEEP = 100_000  # far past what json.loads can parse


def deep_text(n: int) -> str:
    """JSON text of n lists inside each other."""
    return "[" * n + "]" * n


def deep_value(n: int, leaf=None):
    """A Python value of n lists inside each other, built without recursion."""
    value = leaf
    for _ in range(n):
        value = [value]
    return value


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def error_of(path: Path, **options) -> str:
    with pytest.raises(PrefoptError) as info:
        load(str(path), options=Options(**options))
    return str(info.value)


# --- JSON nested deeper than the parser allows ---------------------------------------------------


def test_deep_jsonl_line_is_a_bad_record(tmp_path):
    path = write_jsonl(
        tmp_path / "deep.jsonl",
        [json.dumps(GOOD), '{"prompt": ' + deep_text(DEEP) + ', "chosen": " a", "rejected": " b"}', json.dumps(GOOD)],
    )
    text = error_of(path)
    assert f"{path} line 2" in text and PARSER_LIMIT in text and "on_bad_record" in text
    assert "\n" not in text and len(text) < 500
    loaded = load(str(path), options=Options(on_bad_record="skip"))
    assert loaded.records == 3 and len(loaded.items) == 2
    assert dict(loaded.skipped) == {"nested too deeply": 1}
    assert f"{path} line 2" in loaded.examples["nested too deeply"]


def test_deep_json_file_names_the_line(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text(
        "[\n" + json.dumps(GOOD) + ',\n{"prompt": ' + deep_text(DEEP) + ', "chosen": " a", "rejected": " b"}\n]'
    )
    for skip in ("error", "skip"):  # the file cannot be parsed at all: an error either way
        text = error_of(path, on_bad_record=skip)
        assert f"{path} line 3" in text and PARSER_LIMIT in text and len(text) < 500


def test_deep_csv_cell_names_line_and_field(tmp_path):
    path = tmp_path / "deep.csv"
    path.write_text(f'prompt,chosen,rejected\nHi?, Hello., Go away.\n"{deep_text(DEEP)}", a, b\n')
    text = error_of(path)
    assert f"{path} line 3, field 'prompt'" in text and PARSER_LIMIT in text
    loaded = load(str(path), options=Options(on_bad_record="skip"))
    assert len(loaded.items) == 1 and dict(loaded.skipped) == {"nested too deeply": 1}


# --- deep but parseable ---------------------------------------------------------------------------

USER = {"role": "user", "content": "q"}
ASSISTANT = {"role": "assistant", "content": "a"}

# a record nested 500 levels deep in one place, and the field the error names
DEEP_RECORDS = {
    "standard prompt": ({"prompt": deep_value(500), "chosen": " a", "rejected": " b"}, "prompt"),
    "message list": ({"prompt": [deep_value(500)], "chosen": [ASSISTANT], "rejected": [ASSISTANT]}, "prompt"),
    "extra key in a message": (
        {
            "prompt": [{**USER, "meta": deep_value(500)}],
            "chosen": [{**ASSISTANT, "meta": deep_value(500)}],
            "rejected": [{"role": "assistant", "content": "b", "meta": deep_value(500)}],
        },
        "prompt",
    ),
    "unpaired completion": ({"prompt": "p", "completion": deep_value(500), "label": True}, "completion"),
    "ratings": ({"prompt": "p", "completions": deep_value(500)}, "completions"),
    "sharegpt": ({"conversations": deep_value(500), "chosen": {}, "rejected": {}}, "conversations"),
    "unused field": ({**GOOD, "metadata": deep_value(500)}, "metadata"),
}


@pytest.mark.parametrize("name", list(DEEP_RECORDS))
def test_deep_parseable_record_is_a_clear_error(tmp_path, name):
    record, field = DEEP_RECORDS[name]
    path = write_jsonl(tmp_path / "deep.jsonl", [json.dumps(record)])
    text = error_of(path)  # a PrefoptError, not a RecursionError
    assert f"{path} line 1, field '{field}'" in text and f"more than {MAX_DEPTH} levels" in text
    assert len(text) < 500


def test_nesting_up_to_the_limit_is_read(tmp_path):
    meta = deep_value(MAX_DEPTH - 1, "x")  # the record itself is one level: MAX_DEPTH in all
    path = write_jsonl(tmp_path / "ok.jsonl", [json.dumps({**GOOD, "metadata": meta})])
    assert len(load(str(path)).items) == 1
    path = write_jsonl(tmp_path / "deep.jsonl", [json.dumps({**GOOD, "metadata": [meta]})])
    assert f"more than {MAX_DEPTH} levels" in error_of(path)


def test_describe_is_bounded():
    text = _describe(deep_value(50_000, 1))  # deeper than the recursion limit
    assert text.startswith("list ([[[") and len(text) < 80
    assert _describe({"a": 1}) == 'dict ({"a": 1})' and _describe([1, 2]) == "list ([1, 2])"


# --- data check -----------------------------------------------------------------------------------


def run_check(capsys, *args) -> tuple[int, str]:
    code = main(["data", "check", *map(str, args)])
    return code, capsys.readouterr().out


def test_data_check_deep_line(tmp_path, capsys):
    path = write_jsonl(tmp_path / "deep.jsonl", ['{"prompt": ' + deep_text(DEEP) + "}", json.dumps(GOOD)])
    code, out = run_check(capsys, path, "--json")
    r = json.loads(out)
    assert code == 2 and not r["usable"] and r["skipped"] == {"nested too deeply": 1}
    assert any(f"{path} line 1" in p and PARSER_LIMIT in p for p in r["problems"])


def test_data_check_deep_message_extras(tmp_path, capsys):
    record = DEEP_RECORDS["extra key in a message"][0]  # 500 levels broke the chat template
    path = write_jsonl(tmp_path / "deep.jsonl", [json.dumps(record)])
    code, out = run_check(capsys, path, "--json")
    r = json.loads(out)
    assert code == 2 and not r["usable"] and r["skipped"] == {"nested too deeply": 1}


def test_data_check_unpaired_data_for_the_default_paired_loss(tmp_path, capsys):
    path = write_jsonl(tmp_path / "kto.jsonl", [json.dumps(r) for r in UNPAIRED])
    code, out = run_check(capsys, path, "--json")
    r = json.loads(out)
    assert code == 2 and not r["usable"] and r["shape"] == "unpaired"
    assert any("loss 'sigmoid' needs preference pairs" in p and "unpaired" in p for p in r["problems"])
    code, text = run_check(capsys, path)
    assert code == 2 and "problem: loss 'sigmoid' needs preference pairs" in text and "NOT usable" in text
    cfg = tmp_path / "kto.yaml"
    cfg.write_text("loss:\n  name: kto\n")
    code, out = run_check(capsys, path, "--json", "--config", cfg)
    assert code == 0 and json.loads(out)["usable"]


def test_data_check_paired_data_for_an_unpaired_loss(tmp_path, capsys):
    path = write_jsonl(tmp_path / "pairs.jsonl", [json.dumps(GOOD)])
    cfg = tmp_path / "kto.yaml"
    cfg.write_text("loss:\n  name: kto\n")
    code, out = run_check(capsys, path, "--json", "--config", cfg)
    r = json.loads(out)
    assert code == 2 and not r["usable"]
    assert any("loss 'kto' needs unpaired data" in p and "standard pairs" in p for p in r["problems"])
