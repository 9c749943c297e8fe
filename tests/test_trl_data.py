"""Data as TRL users have it: UltraFeedback-binarized records (JSONL, Parquet, a DatasetDict with
train_prefs/test_prefs) with no configuration, score gaps, the other shapes TRL's data utilities
accept, compressed and TSV files, data.fields in rename_column's direction, near-miss errors, and
`source:split` with an evaluation split that is never silently the training split."""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import json
import logging
import lzma
import random
import types
from pathlib import Path

import pytest

from prefopt import config
from prefopt.cli import main
from prefopt.data import examples, sources
from prefopt.data.formats import PROMPT_MISMATCH, SCORE_GAP, SHAPES, Options, Pair, load, load_pairs, options_from
from prefopt.errors import PrefoptError

U, A = "user", "assistant"


def msg(role, content):
    return {"role": role, "content": content}


def ufb(prompt: str, good: str, bad: str, score_chosen=8.0, score_rejected=5.0, i=0) -> dict:
    """One record as in HuggingFaceH4/ultrafeedback_binarized."""
    chosen = [msg(U, prompt), msg(A, good)]
    return {
        "prompt": prompt,
        "prompt_id": f"id{i}",
        "chosen": chosen,
        "rejected": [msg(U, prompt), msg(A, bad)],
        "messages": chosen,
        "score_chosen": score_chosen,
        "score_rejected": score_rejected,
    }


UFB = [
    ufb("Name a colour.", "Blue.", "Seven.", 9.0, 2.0, 0),
    ufb("What is 2+2?", "4", "5", 8.0, 7.5, 1),
    ufb("Say hi.", "Hi!", "No.", 6.0, 6.0, 2),
]
UFB_TEST = [ufb("Capital of France?", "Paris.", "Rome.", 10.0, 1.0, 3)]


def write(path: Path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def error_of(source, **options) -> str:
    with pytest.raises(PrefoptError) as info:
        load(str(source), options=Options(**options))
    text = str(info.value)
    assert "\n" not in text
    return text


def triples(items) -> list:
    return [(p.prompt, p.chosen, p.rejected) for p in items]


EXPECTED = [([msg(U, r["prompt"])], r["chosen"][1:], r["rejected"][1:]) for r in UFB]


# --- UltraFeedback-binarized ------------------------------------------------------------------------


def test_ultrafeedback_jsonl_needs_no_configuration(tmp_path):
    path = write(tmp_path / "ufb.jsonl", UFB)
    loaded = load(path)
    assert loaded.shape == "ultrafeedback" and not loaded.skipped and not loaded.notes
    assert triples(loaded.items) == EXPECTED
    assert loaded.items[0].conversational and loaded.items[1].where == f"{path} line 2"


def test_ultrafeedback_multi_turn_and_system_prompt(tmp_path):
    turns = [msg("system", "Be brief."), msg(U, "Hi"), msg(A, "Hello."), msg(U, "Colour?")]
    rec = {"prompt": "Colour?", "chosen": turns + [msg(A, "Blue.")], "rejected": turns + [msg(A, "Seven.")]}
    (p,), shape = load_pairs(write(tmp_path / "d.jsonl", [rec]))
    assert shape == "ultrafeedback" and p.prompt == turns
    assert (p.chosen, p.rejected) == ([msg(A, "Blue.")], [msg(A, "Seven.")])


def test_ultrafeedback_prompt_that_differs_is_noted_and_the_turns_used(tmp_path):
    recs = [UFB[0], {**UFB[1], "prompt": "Something else"}]
    loaded = load(write(tmp_path / "d.jsonl", recs))
    assert triples(loaded.items) == EXPECTED[:2]
    assert dict(loaded.notes) == {PROMPT_MISMATCH: 1}
    assert (
        "line 2" in loaded.note_examples[PROMPT_MISMATCH]
        and "'Something else'" in loaded.note_examples[PROMPT_MISMATCH]
    )
    assert "noted: 1" in loaded.report()
    # whitespace around the prompt is not a difference
    assert not load(write(tmp_path / "e.jsonl", [{**UFB[0], "prompt": " Name a colour.\n"}])).notes


def test_ultrafeedback_bad_records(tmp_path):
    same = ufb("Q?", "A.", "A.")
    loaded = load(write(tmp_path / "same.jsonl", [UFB[0], same]))
    assert len(loaded.items) == 1 and dict(loaded.skipped) == {"chosen equals rejected": 1}
    diverge = {**UFB[0], "rejected": [msg(U, "Other?"), msg(A, "x")]}
    text = error_of(write(tmp_path / "d.jsonl", [UFB[0], diverge]))
    assert "line 2" in text and "differ at message 0" in text


def test_ultrafeedback_parquet(tmp_path):
    import datasets

    path = tmp_path / "ufb.parquet"
    datasets.Dataset.from_list(UFB).to_parquet(str(path))
    loaded = load(str(path))
    assert loaded.shape == "ultrafeedback" and triples(loaded.items) == EXPECTED
    assert loaded.items[0].where == f"{path} record 0"


@pytest.fixture
def ufb_dict(tmp_path) -> Path:
    """A save_to_disk DatasetDict with the splits of HuggingFaceH4/ultrafeedback_binarized's preferences."""
    import datasets

    folder = tmp_path / "ufb"
    datasets.DatasetDict(
        {"train_prefs": datasets.Dataset.from_list(UFB), "test_prefs": datasets.Dataset.from_list(UFB_TEST)}
    ).save_to_disk(str(folder))
    return folder


def test_ultrafeedback_datasetdict_splits(ufb_dict):
    loaded = load(f"{ufb_dict}:train_prefs")
    assert loaded.shape == "ultrafeedback" and triples(loaded.items) == EXPECTED
    assert loaded.split == "train_prefs" and loaded.items[0].where == f"{ufb_dict}:train_prefs record 0"
    assert len(load(str(ufb_dict), split="test_prefs").items) == 1
    assert len(load(f"{ufb_dict}:test_prefs", split="train_prefs").items) == 1  # the suffix wins
    text = error_of(ufb_dict)  # data.split's default, train, is not there
    assert "no split 'train'" in text and "train_prefs, test_prefs" in text and f"{ufb_dict}:train_prefs" in text


def test_shared_hh_conversations_as_ultrafeedback(shared_data, tmp_path):
    """The HH conversational pairs, written as UltraFeedback records (multi-turn prompts inside chosen
    and rejected), give exactly the same pairs."""
    conv = load(str(shared_data / "hh-harmless-train.conversational.jsonl"))
    recs = [
        {"prompt": p.prompt[-1]["content"], "chosen": p.prompt + p.chosen, "rejected": p.prompt + p.rejected}
        for p in conv.items
    ]
    loaded = load(write(tmp_path / "hh-ufb.jsonl", recs))
    assert loaded.shape == "ultrafeedback" and not loaded.notes and not loaded.skipped
    assert triples(loaded.items) == triples(conv.items)


# --- min_score_gap ----------------------------------------------------------------------------------


def test_min_score_gap_skips_close_pairs_counted(tmp_path):
    path = write(tmp_path / "ufb.jsonl", UFB)
    loaded = load(path, options=Options(min_score_gap=0.5))  # gaps 7, 0.5 (not more than 0.5), 0
    assert triples(loaded.items) == EXPECTED[:1]
    assert dict(loaded.skipped) == {SCORE_GAP: 2} and "line 2" in loaded.examples[SCORE_GAP]
    assert len(load(path, options=Options(min_score_gap=0)).items) == 2  # only the tie goes
    assert len(load(path).items) == 3  # off by default


def test_min_score_gap_without_scores_is_an_error(tmp_path):
    plain = {"prompt": "p", "chosen": " a", "rejected": " b"}
    text = error_of(write(tmp_path / "a.jsonl", [plain]), min_score_gap=1.0)
    assert "line 1" in text and "no scores" in text and "score_chosen" in text and "min_score_gap: null" in text
    text = error_of(write(tmp_path / "a.jsonl", [plain]), min_score_gap=1.0, on_bad_record="skip")
    assert "no scores" in text  # no record has scores: an error even when bad records are skipped
    unscored = {k: v for k, v in UFB[0].items() if not k.startswith("score")}
    path = write(tmp_path / "b.jsonl", [UFB[0], unscored])
    assert "line 2" in error_of(path, min_score_gap=1.0)  # after scored records: a bad record
    loaded = load(path, options=Options(min_score_gap=1.0, on_bad_record="skip"))
    assert len(loaded.items) == 1 and sum(loaded.skipped.values()) == 1


def test_min_score_gap_other_score_names_and_renames(tmp_path):
    def rated(i, c, r):
        return {"prompt": f"q{i}", "chosen": " a", "rejected": " b", "chosen-rating": c, "rejected-rating": r}

    path = write(tmp_path / "a.jsonl", [rated(0, 5, 1), rated(1, 4, 4)])  # argilla's cleaned UltraFeedback names
    assert [p.prompt for p in load(path, options=Options(min_score_gap=0)).items] == ["q0"]
    mine = [{"prompt": "q", "chosen": " a", "rejected": " b", "good_score": "3", "bad_score": "1"}]
    fields = {"good_score": "score_chosen", "bad_score": "score_rejected"}
    path = write(tmp_path / "b.jsonl", mine)
    assert len(load(path, options=Options(min_score_gap=1.5, fields=fields)).items) == 1
    assert len(load(path, options=Options(min_score_gap=2, fields=fields)).items) == 0
    bad = [{**mine[0], "good_score": "high"}]
    assert "field 'score_chosen'" in error_of(write(tmp_path / "c.jsonl", bad), min_score_gap=1, fields=fields)


def test_min_score_gap_wrong_data_and_values(tmp_path):
    ratings = {"prompt": "p", "responses": ["a", "b"], "scores": [2, 1]}
    assert "ratings_min_gap" in error_of(write(tmp_path / "r.jsonl", [ratings]), min_score_gap=1)
    kto = {"prompt": "p", "completion": " a", "label": True}
    assert "unpaired data" in error_of(write(tmp_path / "k.jsonl", [kto]), min_score_gap=1)
    path = write(tmp_path / "u.jsonl", UFB)
    for bad in (-1, "1", True):
        assert "data.min_score_gap must be a number >= 0" in error_of(path, min_score_gap=bad)


def test_min_score_gap_read_from_the_data_config():
    d = types.SimpleNamespace(**dataclasses.asdict(config.DataConfig()))
    assert options_from(d).min_score_gap is None
    d.min_score_gap = 1.5
    assert options_from(d).min_score_gap == 1.5


# --- other shapes TRL's data utilities accept -----------------------------------------------------


def test_sharegpt_style_messages_in_chosen_and_rejected(tmp_path):
    """TRL's maybe_convert_to_chatml: {"from", "value"} messages in any message field."""

    def sg(who, text):
        return {"from": who, "value": text}

    rec = {"chosen": [sg("human", "Hi"), sg("gpt", "Hello.")], "rejected": [sg("human", "Hi"), sg("gpt", "Go.")]}
    (p,), shape = load_pairs(write(tmp_path / "d.jsonl", [rec]))
    assert shape == "implicit" and p.prompt == [msg(U, "Hi")] and p.rejected == [msg(A, "Go.")]
    rec = {
        "prompt": [sg("system", "Be kind."), sg("human", "Hi")],
        "chosen": [sg("gpt", "a")],
        "rejected": [sg("gpt", "b")],
    }
    (p,), shape = load_pairs(write(tmp_path / "e.jsonl", [rec]))
    assert shape == "conversational" and p.prompt == [msg("system", "Be kind."), msg(U, "Hi")]
    rec = {"messages": [sg("human", "Hi"), sg("gpt", "Hello.")], "label": True}
    (u,), shape = load_pairs(write(tmp_path / "f.jsonl", [rec]))
    assert shape == "unpaired" and u.completion == [msg(A, "Hello.")]


def test_openai_style_messages(tmp_path):
    def parts(*texts):
        return [{"type": "text", "text": t} for t in texts]

    rec = {
        "prompt": [{"role": "developer", "content": "Be brief."}, {"role": U, "content": parts("Name ", "a colour.")}],
        "chosen": [{"role": A, "content": parts("Blue.")}],
        "rejected": [{"role": A, "content": "Seven."}],
    }
    (p,), _ = load_pairs(write(tmp_path / "d.jsonl", [rec]))
    assert p.prompt == [msg("system", "Be brief."), msg(U, "Name a colour.")] and p.chosen == [msg(A, "Blue.")]
    image = {**rec, "chosen": [{"role": A, "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    text = error_of(write(tmp_path / "e.jsonl", [image]))
    assert "field 'chosen[0].content'" in text and "only text ones" in text


def test_argilla_and_orca_shapes(tmp_path):
    arg = {
        "source": "x",
        "instruction": "Q?",
        "chosen_response": "A.",
        "rejected_response": "B.",
        "chosen_avg_rating": 5,
    }
    (p,), shape = load_pairs(write(tmp_path / "a.jsonl", [arg]))
    assert shape == "argilla" and p == Pair("Q?", "A.", "B.", f"{tmp_path / 'a.jsonl'} line 1")
    orca = [
        {"system": "", "question": "Q?", "chosen": "A.", "rejected": "B."},
        {"system": "Be kind.", "question": "R?", "chosen": "C.", "rejected": "D."},
    ]
    pairs, shape = load_pairs(write(tmp_path / "o.jsonl", orca))
    assert shape == "orca" and pairs[0].prompt == [msg(U, "Q?")] and pairs[0].chosen == [msg(A, "A.")]
    assert pairs[1].prompt == [msg("system", "Be kind."), msg(U, "R?")] and pairs[1].rejected == [msg(A, "D.")]


def test_shapes_table_lists_the_new_shapes():
    assert {"ultrafeedback", "argilla", "orca"} <= set(SHAPES)
    builtin = ("unpaired", "sharegpt", "ratings", "argilla", "orca", "implicit", "ultrafeedback", "conversational")
    assert all(SHAPES[name].required for name in builtin + ("standard",))  # each can be named in a near miss


# --- compressed and TSV files ---------------------------------------------------------------------

PAIRS = [
    {"prompt": "Hi?", "chosen": " Hello.", "rejected": " Go."},
    {"prompt": "2+2=", "chosen": " 4", "rejected": " 5"},
]
JSONL = "".join(json.dumps(r) + "\n" for r in PAIRS).encode()


@pytest.mark.parametrize(
    "name, data",
    [
        ("d.jsonl.gz", gzip.compress(JSONL)),
        ("d.jsonl.bz2", bz2.compress(JSONL)),
        ("d.jsonl.xz", lzma.compress(JSONL)),
        ("d.json.gz", gzip.compress(json.dumps(PAIRS).encode())),
        ("d.csv.gz", gzip.compress(b"prompt,chosen,rejected\nHi?, Hello., Go.\n2+2=, 4, 5\n")),
        ("d.tsv", b"prompt\tchosen\trejected\nHi?\t Hello.\t Go.\n2+2=\t 4\t 5\n"),
        ("d.tsv.gz", gzip.compress(b"prompt\tchosen\trejected\nHi?\t Hello.\t Go.\n2+2=\t 4\t 5\n")),
        ("D.JSONL.GZ", gzip.compress(JSONL)),
    ],
    ids=lambda value: value if isinstance(value, str) else "",  # gzip bytes carry a time: not an id
)
def test_compressed_and_tsv_files(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    pairs, shape = load_pairs(str(path))
    assert shape == "standard" and [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        (r["prompt"], r["chosen"], r["rejected"]) for r in PAIRS
    ]
    assert pairs[0].where.startswith(str(path))


def test_tsv_cells_as_csv_cells(tmp_path):
    path = tmp_path / "d.tsv"
    msgs = json.dumps([msg(U, "q")])
    path.write_text(f"prompt\tchosen\trejected\n{msgs}\t{json.dumps([msg(A, 'a, b')])}\t{json.dumps([msg(A, 'c')])}\n")
    (p,), shape = load_pairs(str(path))
    assert shape == "conversational" and p.chosen == [msg(A, "a, b")]
    kto = tmp_path / "k.tsv"
    kto.write_text("prompt\tcompletion\tlabel\nq\t yes\ttrue\nq\t no\tmaybe\n")
    text = error_of(kto)
    assert f"{kto} line 3" in text and "field 'label'" in text


def test_compressed_errors_name_file_and_line(tmp_path):
    bad_line = JSONL + b'{"prompt": "x", "chosen": " y"}\n'
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(gzip.compress(bad_line))
    assert f"{path} line 3" in error_of(path) and "'rejected'" in error_of(path)
    junk = tmp_path / "junk.jsonl.gz"
    junk.write_bytes(b"not gzip at all")
    assert f"{junk} line 1" in error_of(junk) and "not a readable gzip file" in error_of(junk)
    rng = random.Random(0)
    big = "".join(
        json.dumps({"prompt": "".join(rng.choice("abcdef ") for _ in range(300)), "chosen": " a", "rejected": " b"})
        + "\n"
        for _ in range(200)
    ).encode()
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(big)[:20000])
    text = error_of(cut)
    assert f"{cut} line " in text and "corrupt or truncated" in text
    cut_json = tmp_path / "cut.json.xz"
    cut_json.write_bytes(lzma.compress(json.dumps(PAIRS).encode())[:40])
    assert str(cut_json) in error_of(cut_json) and "not a readable xz file" in error_of(cut_json)


def test_unsupported_compressions(tmp_path):
    zst = tmp_path / "d.jsonl.zst"
    zst.write_bytes(b"\x28\xb5\x2f\xfd junk")
    text = error_of(zst)
    assert str(zst) in text and "zstd -d" in text and "decompress it first" in text
    pq = tmp_path / "d.parquet.gz"
    pq.write_bytes(b"junk")
    assert "compressed inside" in error_of(pq)
    txt = tmp_path / "d.txt.gz"
    txt.write_bytes(gzip.compress(b"x"))
    assert "unknown file type '.txt.gz'" in error_of(txt) and ".tsv" in error_of(txt)


# --- data.fields: {your column: prefopt's name} ---------------------------------------------------

SE = {"qid": 1, "instruction": "Q?", "response_j": " good", "response_k": " bad"}


def test_fields_follow_rename_column(tmp_path):
    path = write(tmp_path / "se.jsonl", [SE])
    fields = {"instruction": "prompt", "response_j": "chosen", "response_k": "rejected"}
    (p,), shape = load_pairs(path, options=Options(fields=fields))
    assert shape == "standard" and (p.prompt, p.chosen, p.rejected) == ("Q?", " good", " bad")
    swapped = {"chosen": "rejected", "rejected": "chosen"}  # renamed at once, as rename_columns does
    (p,), _ = load_pairs(write(tmp_path / "s.jsonl", PAIRS[:1]), options=Options(fields=swapped))
    assert (p.chosen, p.rejected) == (" Go.", " Hello.")


def test_fields_written_the_old_way_round(tmp_path):
    path = write(tmp_path / "se.jsonl", [SE])
    text = error_of(path, fields={"prompt": "instruction", "chosen": "response_j", "rejected": "response_k"})
    assert text.startswith(f"{path}: data.fields") and "rename_column" in text
    assert "Write data.fields: {instruction: prompt, response_j: chosen, response_k: rejected}." in text


def test_fields_in_the_new_direction_are_not_taken_for_the_old(tmp_path):
    path = write(tmp_path / "d.jsonl", PAIRS)  # has prompt, not question: {question: prompt} names a missing column
    text = error_of(path, fields={"question": "prompt"})
    assert "data.fields renames 'question', but the data has no such column; its columns: prompt" in text


def test_fields_naming_a_missing_column(tmp_path):
    path = write(tmp_path / "se.jsonl", [SE, {k: v for k, v in SE.items() if k != "response_k"}])
    fields = {"instruction": "prompt", "response_j": "chosen", "respnse_k": "rejected"}
    text = error_of(path, fields=fields)
    assert text.startswith(f"{path}: data.fields renames 'respnse_k'")
    assert "its columns: qid, instruction, response_j, response_k" in text and "did you mean 'response_k'" in text
    fields = {"instruction": "prompt", "response_j": "chosen", "response_k": "rejected"}
    text = error_of(path, fields=fields)  # a later record without it: that record is bad
    assert f"{path} line 2" in text and "missing field 'response_k'" in text
    loaded = load(path, options=Options(fields=fields, on_bad_record="skip"))
    assert len(loaded.items) == 1 and dict(loaded.skipped) == {"missing field": 1}


def test_fields_old_direction_in_a_config_file(tmp_path):
    path = write(tmp_path / "se.jsonl", [SE])
    cfg = config.from_dict({"data": {"train": path, "fields": {"prompt": "instruction"}}})
    text = error_of(path, **{"fields": options_from(cfg.data).fields})
    assert "Write data.fields: {instruction: prompt}." in text


# --- near-miss errors -----------------------------------------------------------------------------

NEAR = {
    "reject": ({"prompt": "p", "chosen": " a", "reject": " b"}, "standard", "data.fields: {reject: rejected}"),
    "labels": ({"prompt": "p", "completion": " a", "labels": True}, "unpaired", "data.fields: {labels: label}"),
    "stack exchange": (
        {"qid": 1, "question": "q", "response_j": " a", "response_k": " b"},
        "orca",
        "data.fields: {response_j: chosen, response_k: rejected}",
    ),
    "conversation": (
        {"conversation": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"}, "rejected": {}},
        "sharegpt",
        "data.fields: {conversation: conversations}",
    ),
    "chosen_response": (
        {"prompt": "p", "chosen_response": " a", "rejected_response": " b"},
        "standard",
        "data.fields: {chosen_response: chosen, rejected_response: rejected}",
    ),
}


@pytest.mark.parametrize("name", list(NEAR))
def test_near_miss_names_the_shape_and_the_fix(tmp_path, name):
    record, shape, fix = NEAR[name]
    path = write(tmp_path / "d.jsonl", [record])
    text = error_of(path)
    assert f"look like the {shape} shape" in text and fix in text
    # no shape matches, or (with chosen and rejected but no prompt) the implicit shape fails
    assert f"{path} line 1: missing field" in text or "also look like" in text
    mapping = dict(item.split(": ") for item in fix.split("data.fields: {")[1].rstrip("}").split(", "))
    if name != "conversation":  # the suggested mapping makes the record load (the sharegpt one is incomplete)
        assert load(path, options=Options(fields=mapping)).shape == shape


def test_near_miss_with_a_field_missing_and_sft_data(tmp_path):
    text = error_of(write(tmp_path / "a.jsonl", [{"prompt": "p", "chosen": " a"}]))
    assert "missing field 'rejected'" in text and "standard shape (prompt, chosen, rejected)" in text
    assert "nothing in the record resembles 'rejected'" in text
    text = error_of(write(tmp_path / "b.jsonl", [{"prompt": "p", "completion": " a"}]))
    assert "unpaired shape (prompt, completion, label)" in text and "prompt-completion (SFT) data" in text
    text = error_of(write(tmp_path / "c.jsonl", [{"messages": [msg(U, "q"), msg(A, "a")]}]))
    assert "missing field 'label'" in text and "language-modelling (SFT) data" in text
    text = error_of(write(tmp_path / "d.jsonl", [{"instruction": "q", "chosen": " a", "rejected": " b"}]))
    assert "share no prefix" in text and "data.fields: {instruction: prompt}" in text


# --- splits -----------------------------------------------------------------------------------------


def test_parse_source(tmp_path):
    assert sources.parse_source("HuggingFaceH4/ultrafeedback_binarized:train_prefs") == (
        "HuggingFaceH4/ultrafeedback_binarized",
        "train_prefs",
    )
    assert sources.parse_source("owner/name") == ("owner/name", None)
    assert sources.parse_source("hf://datasets/x/y") == ("hf://datasets/x/y", None)
    assert sources.parse_source("missing:pairs.jsonl") == ("missing:pairs.jsonl", None)  # a file name, not a split
    odd = tmp_path / "a:b.jsonl"  # a path that exists as written is not split
    odd.write_text(json.dumps(PAIRS[0]) + "\n")
    assert sources.parse_source(str(odd)) == (str(odd), None)
    assert len(load(str(odd)).items) == 1


def test_split_suffix_errors(tmp_path):
    import datasets

    path = write(tmp_path / "d.jsonl", PAIRS)
    assert "a file has no splits" in error_of(f"{path}:train")
    folder = tmp_path / "single"
    datasets.Dataset.from_list(PAIRS).save_to_disk(str(folder))
    assert "one dataset, without splits" in error_of(f"{folder}:test")
    assert len(load(str(folder), split="anything").items) == 2  # data.split does not apply to it


def data_cfg(**kw):
    return types.SimpleNamespace(**{**dataclasses.asdict(config.DataConfig()), **kw})


def test_eval_reads_the_evaluation_split_of_the_same_dataset(ufb_dict, caplog):
    d = data_cfg(train=f"{ufb_dict}:train_prefs", eval=str(ufb_dict))
    assert examples.eval_source(d) == (str(ufb_dict), "test_prefs")
    d = data_cfg(train=str(ufb_dict), split="train_prefs", eval=str(ufb_dict))
    assert examples.eval_source(d) == (str(ufb_dict), "test_prefs")
    d = data_cfg(train=str(ufb_dict), split="train_prefs", eval_split="test_prefs")  # data.eval unset
    assert examples.eval_source(d) == (str(ufb_dict), "test_prefs")
    d = data_cfg(train=str(ufb_dict), split="train_prefs", eval=f"{ufb_dict}:train_prefs")
    with caplog.at_level(logging.WARNING, logger="prefopt"):
        assert examples.eval_source(d) == (str(ufb_dict), "train_prefs")  # asked for: read, with a warning
    assert "the training split (train_prefs)" in caplog.text
    assert examples.eval_source(data_cfg(train=str(ufb_dict))) is None


@pytest.mark.parametrize(
    "splits, train_split, expected",
    [
        (["train", "test"], "train", "test"),
        (["train", "validation"], "train", "validation"),
        (["train_prefs", "test_prefs", "train_sft", "test_sft", "test_gen"], "train_prefs", "test_prefs"),
        (["train", "eval", "test"], "train", "several (eval, test)"),
        (["train", "extra"], "train", "none"),
        (["train"], "train", "none"),
    ],
)
def test_eval_split_choice(tmp_path, splits, train_split, expected):
    import datasets

    folder = tmp_path / "dd"
    datasets.DatasetDict({s: datasets.Dataset.from_list(PAIRS) for s in splits}).save_to_disk(str(folder))
    d = data_cfg(train=f"{folder}:{train_split}", eval=str(folder))
    if expected in splits:
        assert examples.eval_source(d) == (str(folder), expected)
        return
    with pytest.raises(PrefoptError) as info:
        examples.eval_source(d)
    text = str(info.value)
    assert f"{expected} of its splits ({', '.join(splits)})" in text and f"data.eval: {folder}:<split>" in text


def test_eval_from_other_sources(tmp_path, ufb_dict):
    import datasets

    train = write(tmp_path / "train.jsonl", PAIRS)
    other = tmp_path / "other"
    datasets.DatasetDict({"heldout": datasets.Dataset.from_list(PAIRS)}).save_to_disk(str(other))
    assert examples.eval_source(data_cfg(train=train, eval=str(other))) == (str(other), "heldout")
    assert examples.eval_source(data_cfg(train=train, eval=str(ufb_dict))) == (str(ufb_dict), "test_prefs")
    both = tmp_path / "both"
    datasets.DatasetDict({"a": datasets.Dataset.from_list(PAIRS), "b": datasets.Dataset.from_list(PAIRS)}).save_to_disk(
        str(both)
    )
    with pytest.raises(PrefoptError, match="a dataset with several splits but no split"):
        examples.eval_source(data_cfg(train=train, eval=str(both)))
    assert examples.eval_source(data_cfg(train=train, eval=f"{both}:b")) == (str(both), "b")
    assert examples.eval_source(data_cfg(train=train, eval=train)) == (train, None)  # a file: its records


def test_load_examples_logs_sources_and_splits(ufb_dict, smol_tokenizer, caplog):
    cfg = config.from_dict({"data": {"train": f"{ufb_dict}:train_prefs", "eval": str(ufb_dict), "eval_fraction": 0.5}})
    with caplog.at_level(logging.INFO, logger="prefopt"):
        train, held_out, _ = examples.load_examples(cfg, smol_tokenizer, config.resolve_loss(cfg.loss), progress=False)
    assert (len(train), len(held_out)) == (3, 1)
    assert f"train data: {ufb_dict}, split train_prefs: 3 records, shape ultrafeedback" in caplog.text
    assert f"eval data: {ufb_dict}, split test_prefs: 1 records" in caplog.text
    assert "data.eval_fraction 0.5 is not used" in caplog.text


def test_load_examples_refuses_an_ambiguous_eval_before_reading(tmp_path, smol_tokenizer):
    import datasets

    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS)}).save_to_disk(str(folder))
    cfg = config.from_dict({"data": {"train": str(folder), "eval": str(folder)}})
    with pytest.raises(PrefoptError, match="same dataset as data.train but no split"):
        examples.load_examples(cfg, smol_tokenizer, config.resolve_loss(cfg.loss), progress=False)


# --- data check -----------------------------------------------------------------------------------


def test_data_check_ultrafeedback_split_and_notes(ufb_dict, capsys):
    import datasets

    recs = UFB + [{**UFB[0], "prompt": "Not the turn."}]
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(recs)}).save_to_disk(str(ufb_dict) + "2")
    code = main(["data", "check", f"{ufb_dict}2:train_prefs", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert code == 0 and r["usable"] and (r["shape"], r["split"], r["examples"]) == ("ultrafeedback", "train_prefs", 4)
    assert r["notes"] == {PROMPT_MISMATCH: 1}
    assert any(PROMPT_MISMATCH in w and "record 3" in w for w in r["warnings"])
    code = main(["data", "check", f"{ufb_dict}2:train_prefs"])
    text = capsys.readouterr().out
    assert "4 records (split train_prefs)" in text and f"warning: 1 record(s): {PROMPT_MISMATCH}" in text
