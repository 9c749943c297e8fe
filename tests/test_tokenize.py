"""prefopt.data.tokenize.PairTokenizer with the real SmolLM2 tokenizer (ChatML, pad = eos = <|im_end|>)."""

from __future__ import annotations

import pytest

from prefopt.data.formats import Pair, load_pairs
from prefopt.data.tokenize import PairTokenizer, tokenize_pairs
from prefopt.errors import PrefoptError


@pytest.fixture(scope="module")
def tok(smol_tokenizer):
    return smol_tokenizer


def _ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


STANDARD = [
    (
        "\n\nHuman: How do I boil an egg?\n\nAssistant:",
        " Put it in boiling water for nine minutes.",
        " Eggs are laid by hens.",
    ),
    ("Translate to French: cat", " chat", " Le chien est dans le jardin, je crois."),
    ("Q: 2+2=?\nA:", " 4", " 5\n\nsome trailing text with  double  spaces and ünïcödé ✓"),
]


@pytest.mark.parametrize("prompt,chosen,rejected", STANDARD)
def test_standard_strings(tok, prompt, chosen, rejected):
    pt = PairTokenizer(tok, max_length=512, max_prompt_length=256)
    ex = pt(Pair(prompt, chosen, rejected, "test"))
    eos = tok.eos_token_id
    assert ex["prompt_ids"] == _ids(tok, prompt)
    for resp, ids in ((chosen, ex["chosen_ids"]), (rejected, ex["rejected_ids"])):
        assert ids[-1] == eos and ids.count(eos) == 1
        assert ids[:-1] == _ids(tok, resp)
        assert tok.decode(ex["prompt_ids"] + ids[:-1]) == prompt + resp
    assert eos not in ex["prompt_ids"]
    # SmolLM2 adds no BOS, and PairTokenizer adds none either
    assert pt.bos is None
    assert tok.bos_token_id not in ex["prompt_ids"] + ex["chosen_ids"] + ex["rejected_ids"]
    assert pt.stats.pairs == 1 and pt.stats.truncated == 0 and pt.stats.dropped_too_long == 0


def test_response_already_ending_in_eos_gets_no_second_one(tok):
    pt = PairTokenizer(tok)
    ex = pt(Pair("Hi", " there<|im_end|>", " you", "test"))
    assert ex["chosen_ids"].count(tok.eos_token_id) == 1
    assert ex["chosen_ids"] == _ids(tok, " there") + [tok.eos_token_id]


CONVERSATIONS = [
    pytest.param(
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "assistant", "content": "4."}],
        [{"role": "assistant", "content": "Probably 5, but let me think about it more."}],
        id="single-turn",
    ),
    pytest.param(
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fruit."}],
        [{"role": "assistant", "content": "Apple."}],
        [{"role": "assistant", "content": "There are many fruits\nsuch as apples,\n\nand pears."}],
        id="system",
    ),
    pytest.param(
        [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello, how can I help?"},
            {"role": "user", "content": "Tell me a joke."},
        ],
        [{"role": "assistant", "content": "Why did the chicken cross the road? To get to the other side."}],
        [{"role": "assistant", "content": "No."}],
        id="multi-turn",
    ),
]


@pytest.mark.parametrize("prompt,chosen,rejected", CONVERSATIONS)
def test_conversational(tok, prompt, chosen, rejected):
    pt = PairTokenizer(tok, max_length=1024, max_prompt_length=512)
    ex = pt(Pair(prompt, chosen, rejected, "test"))
    eos = tok.eos_token_id
    rendered_prompt = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    assert ex["prompt_ids"] == _ids(tok, rendered_prompt)
    for resp, ids in ((chosen, ex["chosen_ids"]), (rejected, ex["rejected_ids"])):
        full = tok.apply_chat_template(prompt + resp, tokenize=False)
        assert full.endswith("<|im_end|>\n")  # ChatML: the template puts a newline after end-of-turn
        assert ex["prompt_ids"] + ids == _ids(tok, full[: -len("\n")])
        assert ids[-1] == eos and ids.count(eos) == 1
        assert ids[:-1] == _ids(tok, resp[0]["content"])  # the response tokens are exactly the content
    # the default system prompt appears only when no system turn is given
    has_system = prompt[0]["role"] == "system"
    assert ("named SmolLM" in tok.decode(ex["prompt_ids"])) is not has_system


def test_chat_template_always_wraps_strings(tok):
    pt = PairTokenizer(tok, chat_template="always")
    ex = pt(Pair("What is 2+2?", "4.", "5.", "test"))
    conv = PairTokenizer(tok)(
        Pair(
            [{"role": "user", "content": "What is 2+2?"}],
            [{"role": "assistant", "content": "4."}],
            [{"role": "assistant", "content": "5."}],
            "test",
        )
    )
    assert ex == conv


def test_chat_template_never_refuses_conversational(tok):
    pt = PairTokenizer(tok, chat_template="never")
    with pytest.raises(PrefoptError, match="my.jsonl line 4"):
        pt(
            Pair(
                [{"role": "user", "content": "x"}],
                [{"role": "assistant", "content": "a"}],
                [{"role": "assistant", "content": "b"}],
                "my.jsonl line 4",
            )
        )


def test_empty_prompt_is_an_error_naming_the_record(tok):
    # SmolLM2 adds no BOS: with an empty prompt nothing predicts the first response token
    with pytest.raises(PrefoptError, match=r"f\.jsonl line 3, field 'prompt'"):
        PairTokenizer(tok)(Pair("", " a", " b", "f.jsonl line 3"))


def test_empty_conversational_response_is_an_error(tok):
    pt = PairTokenizer(tok)
    with pytest.raises(PrefoptError, match=r"f\.jsonl line 2, field 'rejected'.*empty"):
        pt(
            Pair(
                [{"role": "user", "content": "x"}],
                [{"role": "assistant", "content": "a"}],
                [{"role": "assistant", "content": ""}],
                "f.jsonl line 2",
            )
        )


def test_truncation_keep_end(tok):
    words = [f"w{i}" for i in range(200)]
    prompt = " ".join(words)
    chosen = " " + " ".join(f"c{i}" for i in range(100))
    rejected = " short"
    p_full, c_full = _ids(tok, prompt), _ids(tok, chosen) + [tok.eos_token_id]
    r_full = _ids(tok, rejected) + [tok.eos_token_id]
    assert len(p_full) > 64 and len(c_full) > 64
    pt = PairTokenizer(tok, max_length=96, max_prompt_length=64, truncation="keep_end")
    ex = pt(Pair(prompt, chosen, rejected, "test"))
    assert ex["prompt_ids"] == p_full[-64:]  # the prompt keeps its end
    assert ex["chosen_ids"] == c_full[:32]  # responses keep their start (the EOS is cut off)
    assert ex["rejected_ids"] == r_full  # short enough: untouched
    assert len(ex["prompt_ids"]) + max(len(ex["chosen_ids"]), len(ex["rejected_ids"])) <= 96
    assert pt.stats.truncated == 1 and pt.stats.dropped_too_long == 0
    # a pair that fits is left alone and not counted
    assert pt(Pair("short", " a", " b", "test")) is not None
    assert pt.stats.truncated == 1 and pt.stats.pairs == 2


def test_truncation_keep_end_prompt_short_response_long(tok):
    prompt = "Hello"
    chosen = " " + " ".join(f"c{i}" for i in range(100))
    pt = PairTokenizer(tok, max_length=40, max_prompt_length=20)
    ex = pt(Pair(prompt, chosen, " b", "test"))
    assert ex["prompt_ids"] == _ids(tok, prompt)
    assert ex["chosen_ids"] == _ids(tok, chosen)[: 40 - len(ex["prompt_ids"])]
    assert pt.stats.truncated == 1


def test_truncation_drop(tok):
    long_prompt = " ".join(f"w{i}" for i in range(200))
    pairs = [
        Pair(long_prompt, " a", " b", "f line 1"),
        Pair("short", " a", " b", "f line 2"),
        Pair("short", " " + "x " * 300, " b", "f line 3"),
    ]
    out, stats = tokenize_pairs(pairs, tok, max_length=96, max_prompt_length=64, truncation="drop")
    assert len(out) == 1 and out[0]["prompt_ids"] == _ids(tok, "short")
    assert stats.pairs == 3 and stats.dropped_too_long == 2 and stats.truncated == 0
    pt = PairTokenizer(tok, max_length=96, max_prompt_length=64, truncation="drop")
    assert pt(pairs[0]) is None
    assert pt.stats.dropped_too_long == 1
    assert "1 dropped as too long" in pt.stats.report()


def test_real_hh_pairs_round_trip(tok, shared_data):
    """The first 50 HH pairs: standard strings round-trip exactly through the tokenizer."""
    pairs, shape = load_pairs(str(shared_data / "hh-harmless-train.jsonl"), limit=50)
    assert shape == "standard" and len(pairs) == 50
    pt = PairTokenizer(tok, max_length=4096, max_prompt_length=2048)
    for pair in pairs:
        ex = pt(pair)
        for resp, ids in ((pair.chosen, ex["chosen_ids"]), (pair.rejected, ex["rejected_ids"])):
            assert tok.decode(ex["prompt_ids"] + ids[:-1]) == pair.prompt + resp, pair.where
            assert ids.count(tok.eos_token_id) == 1 and ids[-1] == tok.eos_token_id
    assert pt.stats.truncated == 0


def test_real_hh_conversational_matches_template(tok, shared_data):
    pairs, shape = load_pairs(str(shared_data / "hh-harmless-train.conversational.jsonl"), limit=20)
    assert shape == "conversational"
    pt = PairTokenizer(tok, max_length=4096, max_prompt_length=2048)
    for pair in pairs:
        ex = pt(pair)
        full = tok.apply_chat_template(pair.prompt + pair.chosen, tokenize=False)
        assert ex["prompt_ids"] + ex["chosen_ids"] == _ids(tok, full.removesuffix("\n")), pair.where
