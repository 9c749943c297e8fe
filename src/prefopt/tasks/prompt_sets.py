"""Prompt sets to sample from, by name: the texts a model continues, and their fixed held-out part.

    code        the code task's problems through the model's chat template (code.chat_prompt), with the
                task's fixed split: train and heldout problems
    code:FILE   the problems of your JSONL problems file (code.load_problems), split by their `split`
                field ("train" when missing); a file without any `split` holds out every third
                problem, as the built-in one does (reward: tests:FILE)
    sentiment   the built-in movie-review openings (raw text); no fixed split
    PATH        a prompts file: .txt (one prompt per line, raw text) or .jsonl/.json records with
                "prompt" (a string, or messages put through the chat template); no fixed split

`prefopt grpo` (grpo.prompts) samples from the train part; the experiments (`prefopt demo`,
`frontier`, `rounds`) train on the train part and evaluate on the held-out one, or hold out their
own prompts where a set has no fixed split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from prefopt.evaluation.generation import read_prompts
from prefopt.tasks import code, sentiment

BUILTIN = ("code", "sentiment")


@dataclass
class PromptSet:
    """The prompt texts of a set: `train`, and `heldout` (None when the set has no fixed split)."""

    train: list[str]
    heldout: Optional[list[str]] = None


def load(name: str, tokenizer) -> PromptSet:
    """The prompt set `name` (see the module docstring), its texts made with `tokenizer`."""
    if name == "code" or name.startswith("code:"):
        problems = code.problems() if name == "code" else code.load_problems(name.split(":", 1)[1])
        if all(p.split is None for p in problems):
            splits = ["heldout" if i % 3 == 2 else "train" for i in range(len(problems))]
        else:
            splits = [p.split or "train" for p in problems]
        texts = [code.chat_prompt(p, tokenizer) for p in problems]
        return PromptSet(
            [t for t, s in zip(texts, splits) if s == "train"], [t for t, s in zip(texts, splits) if s == "heldout"]
        )
    if name == "sentiment":
        return PromptSet(sentiment.prompts())
    texts, _ = read_prompts(name, tokenizer)
    return PromptSet(texts)
