"""Pairs -> token ids, with the prompt/response boundary a model sees at inference.

The prompt is tokenized on its own (for conversational data: the chat template with the
generation prompt), the response on its own, so prompt ids + response ids are exactly what the
model reads and then generates. Each response ends with EOS exactly once (for chat data the
template's end-of-turn token; anything the template puts after it, such as a newline, is not a
response token). No BOS is added twice.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Optional

from tqdm.auto import tqdm

from prefopt.data.formats import Unpaired
from prefopt.errors import PrefoptError

log = logging.getLogger("prefopt")


@dataclass
class TokenizeStats:
    """Counts kept while tokenizing: examples seen, truncated to fit, dropped as too long."""

    pairs: int = 0
    truncated: int = 0
    dropped_too_long: int = 0

    def report(self) -> str:
        """The counts as one line for the log."""
        return (
            f"{self.pairs} pairs tokenized; {self.truncated} truncated to fit data.max_length; "
            f"{self.dropped_too_long} dropped as too long"
        )


@dataclass
class PairTokenizer:
    """Callable: a Pair or Unpaired -> token ids of its prompt and responses, fitted to max_length."""

    tokenizer: object
    max_length: int = 512
    max_prompt_length: int = 256
    truncation: str = "keep_end"  # or "drop"
    chat_template: str = "auto"  # auto | always | never
    stats: TokenizeStats = field(default_factory=TokenizeStats)

    def __post_init__(self):
        tok = self.tokenizer
        self.eos = tok.eos_token_id
        bos = tok.bos_token_id
        # Does this tokenizer add a BOS of its own? (SmolLM2: no; Llama 2/3: yes.)
        probe = tok("a").input_ids
        self.bos = (
            bos
            if bos is not None and probe[:1] == [bos] and tok("a", add_special_tokens=False).input_ids[:1] != [bos]
            else None
        )

    # -- prompt and response ids ------------------------------------------------------------------
    def _text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _template(self, messages, **kw) -> str:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise PrefoptError(
                "conversational data needs a chat template, and this tokenizer has none "
                "(set model.name to a chat model, or give the data as strings)."
            )
        return self.tokenizer.apply_chat_template(messages, tokenize=False, **kw)

    def prompt_ids(self, prompt) -> list[int]:
        """Token ids of a prompt: the chat template with the generation prompt for messages, else the text
        (with BOS when the tokenizer adds one)."""
        if isinstance(prompt, list):
            return self._text_ids(self._template(prompt, add_generation_prompt=True))
        ids = self._text_ids(prompt)
        if self.bos is not None and ids[:1] != [self.bos]:
            ids = [self.bos] + ids
        return ids

    def response_ids(self, prompt, response, where: str, field: str) -> list[int]:
        """Token ids of a response as the model generates it after `prompt`, ending with EOS exactly once."""
        if isinstance(response, list):
            prompt_text = self._template(prompt, add_generation_prompt=True)
            full_text = self._template(prompt + response)
            if not full_text.startswith(prompt_text):
                raise PrefoptError(
                    f"{where}, field '{field}': the chat template renders prompt + response so that it does "
                    "not start with the rendered prompt; the prompt/response boundary is undefined."
                )
            ids = self._text_ids(full_text[len(prompt_text) :])
            if self.eos in ids:  # cut after the last end-of-turn token
                ids = ids[: len(ids) - ids[::-1].index(self.eos)]
            else:
                ids = ids + [self.eos]
        else:
            ids = self._text_ids(response)
            if ids[-1:] != [self.eos]:
                ids = ids + [self.eos]
        if len(ids) < 2:  # nothing but EOS
            raise PrefoptError(f"{where}, field '{field}': the response is empty.")
        return ids

    # -- one record -----------------------------------------------------------------------------------
    def __call__(self, record) -> Optional[dict]:
        """A Pair -> {prompt_ids, chosen_ids, rejected_ids}; an Unpaired -> {prompt_ids,
        completion_ids, label}; None when the record is dropped as too long (counted)."""
        self.stats.pairs += 1
        unpaired = isinstance(record, Unpaired)
        names = ("completion",) if unpaired else ("chosen", "rejected")
        prompt = record.prompt
        responses = [getattr(record, n) for n in names]
        use_template = self.chat_template == "always" or (self.chat_template == "auto" and record.conversational)
        if self.chat_template == "never" and record.conversational:
            raise PrefoptError(
                f"{record.where}: conversational data needs the chat template (data.chat_template is 'never')."
            )
        if use_template and not record.conversational:
            prompt = [{"role": "user", "content": prompt}]
            responses = [[{"role": "assistant", "content": r}] for r in responses]
        p = self.prompt_ids(prompt)
        if not p:
            raise PrefoptError(
                f"{record.where}, field 'prompt': the prompt is empty and this tokenizer adds no "
                "BOS token, so the first response token has nothing to be predicted from."
            )
        ids = [self.response_ids(prompt, r, record.where, n) for r, n in zip(responses, names)]
        fitted = self.fit(p, ids)
        if fitted is None:
            return None
        p, ids = fitted
        if unpaired:
            return {"prompt_ids": p, "completion_ids": ids[0], "label": record.label}
        return {"prompt_ids": p, "chosen_ids": ids[0], "rejected_ids": ids[1]}

    def fit(self, p: list[int], responses: list[list[int]]):
        """Apply the truncation rule: (prompt, responses), or None when dropped (counted)."""
        if len(p) + max(len(r) for r in responses) > self.max_length:
            if self.truncation == "drop":
                self.stats.dropped_too_long += 1
                return None
            self.stats.truncated += 1
            if len(p) > self.max_prompt_length:
                keep = self.max_prompt_length
                p = ([self.bos] + p[len(p) - (keep - 1) :]) if self.bos is not None and p[0] == self.bos else p[-keep:]
            budget = self.max_length - len(p)
            responses = [r[:budget] for r in responses]
        return p, responses


def attach_kl_completions(examples: list[dict], seed: int = 0) -> None:
    """Give each unpaired example a mismatched completion (another example's) for KTO's KL
    baseline z0: a fixed random derangement, so reference log-probs can be precomputed."""
    if len(examples) < 2:
        raise PrefoptError(
            "unpaired training needs at least 2 examples (the KL baseline pairs each "
            "prompt with another example's completion)."
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    for k, i in enumerate(order):
        examples[i]["kl_completion_ids"] = examples[order[(k + 1) % len(order)]]["completion_ids"]


def tokenize_pairs(
    pairs: list,
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    truncation: str = "keep_end",
    chat_template: str = "auto",
    progress: bool = False,
) -> tuple[list[dict], TokenizeStats]:
    """Tokenize every Pair/Unpaired of `pairs`: (the examples kept, the stats); too-long ones are truncated
    or dropped by `truncation`."""
    pt = PairTokenizer(tokenizer, max_length, max_prompt_length, truncation, chat_template)
    it = tqdm(pairs, desc="tokenizing", unit="pair") if progress else pairs
    out = [ex for ex in (pt(pair) for pair in it) if ex is not None]
    log.info(pt.stats.report())
    return out, pt.stats
