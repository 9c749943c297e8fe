"""Every preference-data shape is recognised from its fields and normalised to the same pairs;
the five shared files load in their natural shape with no configuration and train for 2 steps
each with the matching loss family."""

from __future__ import annotations

import csv
import json

import pytest

from prefopt import config
from prefopt.data.formats import SHAPES, Options, Pair, is_paired, load, load_pairs, options_from, recognise
from prefopt.data.tokenize import PairTokenizer
from prefopt.recipes.train import train

U, A = "user", "assistant"


def msg(role, content):
    return {"role": role, "content": content}


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# ---------------------------------------------------------------------------------------------
# The shared files


SHARED = {
    "hh-harmless-train.jsonl": ("standard", 1424, "sigmoid"),
    "hh-harmless-train.conversational.jsonl": ("conversational", 1424, "sigmoid"),
    "hh-harmless-train.transcript.jsonl": ("implicit", 1424, "sigmoid"),
    "sharegpt-dpo-en-demo.json": ("sharegpt", 300, "sigmoid"),
    "kto-en-demo.json": ("unpaired", 300, "kto"),
}


@pytest.mark.parametrize("name", list(SHARED))
def test_shared_files_load_in_their_natural_shape(shared_data, name):
    shape, n, _ = SHARED[name]
    loaded = load(str(shared_data / name))
    assert (loaded.shape, len(loaded.items), loaded.records) == (shape, n, n)
    assert not loaded.skipped


def test_hh_transcripts_give_exactly_the_standard_pairs(shared_data):
    std, _ = load_pairs(str(shared_data / "hh-harmless-train.jsonl"))
    implicit, _ = load_pairs(str(shared_data / "hh-harmless-train.transcript.jsonl"))
    assert [(p.prompt, p.chosen, p.rejected) for p in implicit] == [(p.prompt, p.chosen, p.rejected) for p in std]


def test_sharegpt_multi_turn_becomes_messages(shared_data):
    raw = json.loads((shared_data / "sharegpt-dpo-en-demo.json").read_text())
    pairs, _ = load_pairs(str(shared_data / "sharegpt-dpo-en-demo.json"))
    longest = max(range(len(raw)), key=lambda i: len(raw[i]["conversations"]))
    p, r = pairs[longest], raw[longest]
    assert len(p.prompt) == len(r["conversations"]) >= 3
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    assert [m["role"] for m in p.prompt] == [roles[m["from"]] for m in r["conversations"]]
    assert p.chosen == [msg(A, r["chosen"]["value"])] and p.rejected == [msg(A, r["rejected"]["value"])]
    with_system = next(i for i, x in enumerate(raw) if x["conversations"][0]["from"] == "system")
    assert pairs[with_system].prompt[0]["role"] == "system"


@pytest.mark.parametrize("name", list(SHARED))
def test_shared_files_train_two_steps(shared_data, tiny_dir, tmp_path, name):
    _, _, loss = SHARED[name]
    cfg = config.from_dict(
        {
            "model": {"name": tiny_dir},
            "data": {"train": str(shared_data / name), "limit": 8, "max_length": 128, "max_prompt_length": 64},
            "loss": {"name": loss},
            "reference": {"cache_dir": str(tmp_path / "ref")},
            "train": {
                "output_dir": str(tmp_path / "out"),
                "max_steps": 2,
                "batch_size": 4,
                "lr": 1e-3,
                "progress": False,
            },
        }
    )
    summary = train(cfg)
    assert summary["steps"] == 2 and summary["train_pairs"] == 8
    assert summary["first_loss"] == pytest.approx(0.6931, abs=1e-3) if loss == "sigmoid" else summary["first_loss"] > 0


# ---------------------------------------------------------------------------------------------
# Hand-made files of each shape


@pytest.mark.parametrize(
    "record, shape",
    [
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "standard"),
        ({"prompt": [msg(U, "q")], "chosen": [msg(A, "a")], "rejected": [msg(A, "b")]}, "conversational"),
        ({"prompt": "p", "chosen": [msg(A, "a")], "rejected": "b"}, "conversational"),  # decided by chosen
        ({"chosen": "t1", "rejected": "t2"}, "implicit"),
        # fields of several shapes: the earlier entry of the SHAPES table wins
        ({"prompt": "p", "completion": "c", "label": True, "chosen": "a", "rejected": "b"}, "unpaired"),
        ({"conversations": [], "label": True, "chosen": {}, "rejected": {}, "completions": []}, "unpaired"),
        ({"conversations": [], "chosen": {}, "rejected": {}, "completions": []}, "sharegpt"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "completions": []}, "ratings"),
        ({"chosen": "a", "rejected": "b", "responses": [], "scores": []}, "ratings"),
        ({"label": True, "prompt": "p", "chosen": "a", "rejected": "b"}, "standard"),  # a label alone: not unpaired
        ({"responses": [], "prompt": "p", "chosen": "a", "rejected": "b"}, "standard"),  # responses need scores
        # a text prompt beside whole conversations (UltraFeedback-binarized); a message-list prompt is not one
        (
            {"prompt": "q", "chosen": [msg(U, "q"), msg(A, "a")], "rejected": [msg(U, "q"), msg(A, "b")]},
            "ultrafeedback",
        ),
        ({"prompt": "q", "chosen": [{"from": "human", "value": "q"}], "rejected": []}, "ultrafeedback"),
        ({"prompt": [msg(U, "q")], "chosen": [msg(U, "q"), msg(A, "a")], "rejected": []}, "conversational"),
        ({"instruction": "q", "chosen_response": "a", "rejected_response": "b"}, "argilla"),
        ({"system": "", "question": "q", "chosen": "a", "rejected": "b"}, "orca"),
        ({"question": "q", "prompt": "p", "chosen": "a", "rejected": "b"}, "standard"),  # a prompt: not orca
    ],
)
def test_recognition_follows_the_shapes_table(record, shape):
    assert recognise(record, "r") == shape


def test_shapes_table():
    assert {"standard", "conversational", "implicit", "sharegpt", "unpaired", "ratings"} <= set(SHAPES)
    assert {"ultrafeedback", "argilla", "orca"} <= set(SHAPES)
    assert not is_paired("unpaired") and is_paired("standard") and is_paired("ratings")
    assert is_paired("unknown")  # no record was usable: reported as pairs, as before


def test_implicit_conversations(tmp_path):
    rec = {
        "chosen": [msg("system", "Be kind."), msg(U, "Hi"), msg(A, "Hello!"), msg(U, "Bye"), msg(A, "Bye, take care.")],
        "rejected": [msg("system", "Be kind."), msg(U, "Hi"), msg(A, "Hello!"), msg(U, "Bye"), msg(A, "Whatever.")],
    }
    pairs, shape = load_pairs(write(tmp_path / "d.jsonl", [rec]))
    assert shape == "implicit"
    assert pairs[0].prompt == rec["chosen"][:4]
    assert pairs[0].chosen == [msg(A, "Bye, take care.")] and pairs[0].rejected == [msg(A, "Whatever.")]


def test_implicit_strings_where_responses_start_alike(tmp_path):
    hh = "\n\nHuman: Can you help?\n\nAssistant:"
    rec = {"chosen": hh + " I can help with that.", "rejected": hh + " I can not."}
    (p,), _ = load_pairs(write(tmp_path / "d.jsonl", [rec]))
    assert (p.prompt, p.chosen, p.rejected) == (hh, " I can help with that.", " I can not.")
    # other turn markers by option
    rec = {"chosen": "### User: hi\n### Bot: hello", "rejected": "### User: hi\n### Bot: go"}
    (p,), _ = load_pairs(
        write(tmp_path / "e.jsonl", [rec]), options=Options(assistant_marker="\n### Bot:", user_marker="\n### User:")
    )
    assert (p.prompt, p.chosen, p.rejected) == ("### User: hi\n### Bot:", " hello", " go")


def test_unpaired_shapes(tmp_path):
    recs = [
        {"prompt": "p", "completion": " good", "label": True},
        {"prompt": [msg(U, "q")], "completion": [msg(A, "bad")], "label": False},
    ]
    items, shape = load_pairs(write(tmp_path / "a.jsonl", recs))
    assert shape == "unpaired" and [i.label for i in items] == [True, False]
    assert items[1].prompt == [msg(U, "q")] and items[1].conversational
    sg = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "label": True}]
    items, shape = load_pairs(write(tmp_path / "b.jsonl", sg))
    assert shape == "unpaired" and items[0].prompt == [msg(U, "q")] and items[0].completion == [msg(A, "a")]


RATED = {
    "prompt": "Name a colour.",
    "completions": [
        {"response": " Blue.", "score": 4},
        {"response": " Red!", "score": 5},
        {"response": " Seven.", "score": 1},
        {"response": " Green.", "score": 4.5},
    ],
}


@pytest.mark.parametrize(
    "rule,expected",
    [
        ("best_vs_worst", [(" Red!", " Seven.")]),
        (
            "all_pairs",
            [
                (" Red!", " Green."),
                (" Red!", " Blue."),
                (" Red!", " Seven."),
                (" Green.", " Blue."),
                (" Green.", " Seven."),
                (" Blue.", " Seven."),
            ],
        ),
    ],
)
def test_ratings_rules(tmp_path, rule, expected):
    pairs, shape = load_pairs(write(tmp_path / "r.jsonl", [RATED]), options=Options(ratings_rule=rule))
    assert shape == "ratings"
    assert [(p.chosen, p.rejected) for p in pairs] == expected
    assert all(p.prompt == "Name a colour." for p in pairs)


def test_ratings_gap_random_and_ties(tmp_path):
    path = write(tmp_path / "r.jsonl", [RATED, {"prompt": "tie", "responses": [" a", " b"], "scores": [3, 3]}])
    gap = load(path, options=Options(ratings_rule="all_pairs", ratings_min_gap=1.0))
    assert [(p.chosen, p.rejected) for p in gap.items] == [
        (" Red!", " Seven."),
        (" Green.", " Seven."),
        (" Blue.", " Seven."),
    ]
    assert sum(gap.skipped.values()) == 1 and "line 2" in next(iter(gap.examples.values()))
    rnd = [load(path, options=Options(ratings_rule="best_vs_random", seed=s)).items[0].rejected for s in range(12)]
    assert set(rnd) == {" Blue.", " Seven.", " Green."}  # each lower-scored completion can be drawn
    assert rnd == [
        load(path, options=Options(ratings_rule="best_vs_random", seed=s)).items[0].rejected for s in range(12)
    ]  # and the draw is seeded


def test_ratings_with_conversational_prompt(tmp_path):
    rec = {"prompt": [msg(U, "Name a colour.")], "responses": ["Blue.", "Seven."], "scores": [2, 0]}
    (p,), _ = load_pairs(write(tmp_path / "r.jsonl", [rec]))
    assert p.conversational and p.chosen == [msg(A, "Blue.")] and p.rejected == [msg(A, "Seven.")]


def test_csv_shapes(tmp_path):
    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "chosen", "rejected"])
        w.writerow(["Hi, there?", " Hello,\n friend.", ' "Go" away.'])
        w.writerow([json.dumps([msg(U, "q")]), json.dumps([msg(A, "a")]), json.dumps([msg(A, "b")])])
    with pytest.raises(
        Exception, match="line 4.*conversational.*standard"
    ):  # one shape per file (the quoted newline makes the 3rd row start on line 4)
        load_pairs(str(path))
    (p,), shape = load_pairs(str(path), limit=1)
    assert shape == "standard" and (p.prompt, p.chosen, p.rejected) == (
        "Hi, there?",
        " Hello,\n friend.",
        ' "Go" away.',
    )
    conv = tmp_path / "c.csv"
    with open(conv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "chosen", "rejected"])
        w.writerow([json.dumps([msg(U, "q")]), json.dumps([msg(A, "a")]), json.dumps([msg(A, "b")])])
    (p,), shape = load_pairs(str(conv))
    assert shape == "conversational" and p.prompt == [msg(U, "q")]
    kto = tmp_path / "k.csv"
    kto.write_text("question,answer,label\nq1, yes,true\nq2, no,0\nq3, maybe,Yes\n")
    items, shape = load_pairs(str(kto), options=Options(fields={"question": "prompt", "answer": "completion"}))
    assert shape == "unpaired" and [i.label for i in items] == [True, False, True]


def test_field_remapping_from_config(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"instruction": "q", "response_j": " a", "response_k": " b"}])
    cfg = config.from_dict(
        {"data": {"train": path, "fields": {"instruction": "prompt", "response_j": "chosen", "response_k": "rejected"}}}
    )
    (p,), _ = load_pairs(path, options=options_from(cfg.data))
    assert p == Pair("q", " a", " b", f"{path} line 1")


def test_sharegpt_tokenizes_with_template_and_one_end_of_turn(tmp_path, smol_tokenizer):
    rec = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello."},
            {"from": "human", "value": "Colour?"},
        ],
        "chosen": {"from": "gpt", "value": "Blue."},
        "rejected": {"from": "gpt", "value": "Seven."},
    }
    (p,), _ = load_pairs(write(tmp_path / "s.jsonl", [rec]))
    ex = PairTokenizer(smol_tokenizer)(p)
    tok = smol_tokenizer
    full = tok.apply_chat_template(p.prompt + p.chosen, tokenize=False)
    assert tok.decode(ex["prompt_ids"] + ex["chosen_ids"]) == full.rstrip("\n")
    assert ex["chosen_ids"].count(tok.eos_token_id) == 1 and ex["chosen_ids"][-1] == tok.eos_token_id
    assert tok.decode(ex["prompt_ids"]).endswith("<|im_start|>assistant\n")
