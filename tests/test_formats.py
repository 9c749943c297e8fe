"""prefopt.data.formats.load_pairs: every supported container, and precise errors for bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from prefopt.data.formats import load_pairs
from prefopt.errors import PrefoptError

RECORDS = [
    {"prompt": "Hello?", "chosen": " Hi there.", "rejected": " Go away."},
    {"prompt": "2+2=", "chosen": " 4", "rejected": " 5"},
    {"prompt": "Capital of France?", "chosen": " Paris", "rejected": " Rome"},
]
CONV = [
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "assistant", "content": "What?"}],
    },
    {
        "prompt": [{"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    },
]


def write_jsonl(path: Path, records, raw_lines=None) -> Path:
    lines = raw_lines if raw_lines is not None else [json.dumps(r) for r in records]
    path.write_text("".join(line + "\n" for line in lines))
    return path


def check_standard(pairs, shape, source):
    assert shape == "standard"
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        (r["prompt"], r["chosen"], r["rejected"]) for r in RECORDS
    ]
    assert all(not p.conversational for p in pairs)
    assert all(str(source) in p.where for p in pairs)


def test_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", RECORDS)
    pairs, shape = load_pairs(str(path))
    check_standard(pairs, shape, path)
    assert pairs[1].where == f"{path} line 2"


def test_jsonl_blank_lines_keep_line_numbers(tmp_path):
    lines = [json.dumps(RECORDS[0]), "", "   ", json.dumps(RECORDS[1]), json.dumps(RECORDS[2])]
    path = write_jsonl(tmp_path / "pairs.jsonl", None, lines)
    pairs, _ = load_pairs(str(path))
    assert [p.where for p in pairs] == [f"{path} line 1", f"{path} line 4", f"{path} line 5"]


def test_json_array_and_data_object(tmp_path):
    a = tmp_path / "array.json"
    a.write_text(json.dumps(RECORDS, indent=2))
    pairs, shape = load_pairs(str(a))
    check_standard(pairs, shape, a)
    assert pairs[2].where == f"{a} record 2"
    b = tmp_path / "wrapped.json"
    b.write_text(json.dumps({"data": RECORDS}))
    check_standard(*load_pairs(str(b)), b)


def test_parquet(tmp_path):
    import datasets

    path = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list(RECORDS).to_parquet(str(path))
    check_standard(*load_pairs(str(path)), path)


def test_save_to_disk_folder_and_datasetdict(tmp_path):
    import datasets

    folder = tmp_path / "ds"
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(folder))
    check_standard(*load_pairs(str(folder)), folder)

    dd_folder = tmp_path / "dd"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(RECORDS), "test": datasets.Dataset.from_list(RECORDS[:1])}
    ).save_to_disk(str(dd_folder))
    check_standard(*load_pairs(str(dd_folder)), dd_folder)
    pairs, _ = load_pairs(str(dd_folder), split="test")
    assert len(pairs) == 1
    with pytest.raises(PrefoptError, match="no split 'validation'"):
        load_pairs(str(dd_folder), split="validation")


def test_conversational_jsonl_and_limit(tmp_path):
    path = write_jsonl(tmp_path / "conv.jsonl", CONV)
    pairs, shape = load_pairs(str(path))
    assert shape == "conversational" and len(pairs) == 2
    assert pairs[0].conversational and pairs[0].prompt == CONV[0]["prompt"]
    assert pairs[1].chosen == CONV[1]["chosen"]
    pairs, _ = load_pairs(str(path), limit=1)
    assert len(pairs) == 1


def test_conversational_parquet(tmp_path):
    import datasets

    path = tmp_path / "conv.parquet"
    datasets.Dataset.from_list(CONV).to_parquet(str(path))
    pairs, shape = load_pairs(str(path))
    assert shape == "conversational"
    assert [m["content"] for m in pairs[0].prompt] == ["Be brief.", "Hi"]


def test_shared_hh_files(shared_data):
    std, s1 = load_pairs(str(shared_data / "hh-harmless-train.jsonl"))
    conv, s2 = load_pairs(str(shared_data / "hh-harmless-train.conversational.jsonl"))
    assert (s1, s2) == ("standard", "conversational")
    assert len(std) == len(conv) == 1424
    assert std[0].prompt.endswith("\n\nAssistant:") and std[0].chosen.startswith(" ")


# ---------------------------------------------------------------------------------------------
# Bad input: a PrefoptError whose message names the file, the line or record, and the field.


def raises(source, *fragments):
    with pytest.raises(PrefoptError) as info:
        load_pairs(str(source))
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in message: {msg}"
    assert "\n" not in msg, f"not one line: {msg!r}"
    return msg


def test_missing_field_names_line_and_field(tmp_path):
    recs = [RECORDS[0], {"prompt": "x", "chosen": " y"}, RECORDS[2]]
    path = write_jsonl(tmp_path / "bad.jsonl", recs)
    raises(path, f"{path} line 2", "'rejected'", "missing field")


def test_missing_field_in_json_names_record(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([RECORDS[0], {"prompt": "x", "rejected": " y"}]))
    raises(path, f"{path} record 1", "'chosen'")


def test_non_string_response(tmp_path):
    recs = [RECORDS[0], RECORDS[1], {"prompt": "x", "chosen": 42, "rejected": " y"}]
    path = write_jsonl(tmp_path / "bad.jsonl", recs)
    raises(path, f"{path} line 3", "field 'chosen'", "expected a string", "42")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    raises(path, str(path), "empty")


def test_whitespace_only_file(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text("\n\n  \n")
    raises(path, str(path), "no records")


def test_empty_json_array(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("[]")
    raises(path, str(path), "no records")


def test_invalid_json_line_3(tmp_path):
    lines = [json.dumps(RECORDS[0]), json.dumps(RECORDS[1]), '{"prompt": "x", "chosen": " y", ']
    path = write_jsonl(tmp_path / "bad.jsonl", None, lines)
    raises(path, f"{path} line 3", "invalid JSON")


def test_invalid_json_file_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"prompt": "a", "chosen": "b", "rejected": "c"},\n  {"prompt": oops}\n]')
    raises(path, str(path), "line 3", "invalid JSON")


def test_unknown_role(tmp_path):
    bad = json.loads(json.dumps(CONV[1]))
    bad["prompt"][0]["role"] = "human"
    path = write_jsonl(tmp_path / "bad.jsonl", [CONV[0], bad])
    raises(path, f"{path} line 2", "field 'prompt[0].role'", "'human'", "unknown role")


def test_last_message_must_be_assistant(tmp_path):
    bad = json.loads(json.dumps(CONV[1]))
    bad["chosen"][0]["role"] = "user"
    path = write_jsonl(tmp_path / "bad.jsonl", [bad])
    raises(path, f"{path} line 1", "field 'chosen'", "assistant")


def test_empty_response(tmp_path):
    recs = [RECORDS[0], {"prompt": "x", "chosen": " y", "rejected": "   "}]
    path = write_jsonl(tmp_path / "bad.jsonl", recs)
    raises(path, f"{path} line 2", "field 'rejected'", "empty")


def test_empty_message_list(tmp_path):
    bad = json.loads(json.dumps(CONV[1]))
    bad["chosen"] = []
    path = write_jsonl(tmp_path / "bad.jsonl", [CONV[0], bad])
    # an empty list: a message list with nothing in it, named as such (not as a shape mix-up)
    raises(path, f"{path} line 2", "'chosen'")


def test_mixed_shapes(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [RECORDS[0], RECORDS[1], CONV[0]])
    msg = raises(path, f"{path} line 3", "conversational", "standard")
    assert re.search(r"one shape", msg)


def test_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", None, [json.dumps(RECORDS[0]), json.dumps(["a", "b"])])
    raises(path, f"{path} line 2", "expected a record")


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "nope" / "pairs.jsonl"
    raises(missing, str(missing), "no such file")
    raises("./no-such-file.jsonl", "no-such-file.jsonl", "no such file")


def test_unknown_extension_and_plain_folder(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("prompt,chosen,rejected\na,b,c\n")
    raises(path, str(path), ".txt", ".csv")
    folder = tmp_path / "folder"
    folder.mkdir()
    raises(folder, str(folder), "save_to_disk")


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(RECORDS[0]).encode() + b"\n" + '{"prompt": "caf\xe9"}'.encode("latin-1") + b"\n")
    raises(path, f"{path} line 2", "UTF-8")


def test_limit(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", RECORDS)
    assert [len(load_pairs(str(path), limit=n)[0]) for n in (1, 2, 3, 10, None)] == [1, 2, 3, 3, 3]


@pytest.mark.parametrize("limit", [0, -1])
def test_limit_below_one_gives_no_pairs_or_an_error(tmp_path, limit):
    path = write_jsonl(tmp_path / "pairs.jsonl", RECORDS)
    try:
        pairs, _ = load_pairs(str(path), limit=limit)
    except PrefoptError as e:
        assert "limit" in str(e)
    else:
        assert pairs == []
