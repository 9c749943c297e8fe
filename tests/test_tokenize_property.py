"""Property: for random prompt/response text, prompt ids + response ids decode back to exactly the
text a model sees (raw strings, and chat-templated messages), and the boundary never splits a
character. Runs on the real SmolLM2 tokenizer (byte-level BPE, so any Unicode string is covered)."""

from __future__ import annotations

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from prefopt.data.formats import Pair
from prefopt.data.tokenize import PairTokenizer

# Any Unicode text (emoji, combining marks, CJK, control characters) except surrogates; special
# tokens spelled out in text are a separate matter (the tokenizer parses them as specials).
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=40).filter(
    lambda s: "<|" not in s)
RESPONSE = TEXT.filter(lambda s: s.strip() != "")
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def decode(tok, ids):
    return tok.decode(ids, clean_up_tokenization_spaces=False)


def representable(tok, *texts) -> bool:
    """The tokenizer itself round-trips each text. (The GGUF-derived SmolLM2 vocabulary lacks a few
    byte tokens: it drops e.g. '\x16' and mangles '\U00040000' whoever tokenizes them; that is the
    tokenizer's limit, not the prompt/response boundary's.)"""
    return all(decode(tok, tok(t, add_special_tokens=False).input_ids) == t for t in texts)


@SETTINGS
@given(prompt=TEXT.filter(lambda s: s != ""), chosen=RESPONSE, rejected=RESPONSE)
def test_string_pairs_round_trip(smol_tokenizer, prompt, chosen, rejected):
    tok = smol_tokenizer
    assume(representable(tok, prompt, chosen, rejected))
    ex = PairTokenizer(tok, max_length=10_000, max_prompt_length=5_000)(Pair(prompt, chosen, rejected))
    assert decode(tok, ex["prompt_ids"]) == prompt  # the boundary is a character boundary
    for text, ids in ((chosen, ex["chosen_ids"]), (rejected, ex["rejected_ids"])):
        assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]  # EOS exactly once
        assert decode(tok, ids[:-1]) == text
        assert decode(tok, ex["prompt_ids"] + ids[:-1]) == prompt + text


@SETTINGS
@given(system=st.one_of(st.none(), TEXT), user=TEXT, chosen=RESPONSE, rejected=RESPONSE)
def test_chat_pairs_round_trip(smol_tokenizer, system, user, chosen, rejected):
    tok = smol_tokenizer
    assume(representable(tok, user, chosen, rejected, system or ""))
    prompt = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": user}]
    pair = Pair(prompt, [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}])
    ex = PairTokenizer(tok, max_length=10_000, max_prompt_length=5_000)(pair)
    rendered_prompt = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert decode(tok, ex["prompt_ids"]) == rendered_prompt  # what the model sees at inference
    for resp, ids in ((pair.chosen, ex["chosen_ids"]), (pair.rejected, ex["rejected_ids"])):
        assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]
        full = tok.apply_chat_template(prompt + resp, tokenize=False)
        assert full.startswith(decode(tok, ex["prompt_ids"] + ids))  # prompt + response, then the template's tail
        assert decode(tok, ids[:-1]) == resp[0]["content"]
