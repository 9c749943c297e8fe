"""A config's data, read and tokenized for a loss: the training examples and the held-out ones.

read_data      one source (file, folder, hub id; `source:split`) -> pairs or unpaired records, skips
               counted, the source and split read logged
eval_source    which source and split evaluation reads (never silently the training split)
check_shape    the loss and the data agree on paired vs unpaired
load_examples  train (and eval) sources -> tokenized examples, KL completions where the loss
               needs a baseline
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Optional

from prefopt import losses
from prefopt.data import formats, sources
from prefopt.data.tokenize import attach_kl_completions, tokenize_pairs
from prefopt.errors import PrefoptError

log = logging.getLogger("prefopt")


def read_data(source: str, d, limit=None, *, split: Optional[str] = None, role: str = "data") -> tuple[list, str]:
    """Pairs (or unpaired examples) of `source` read with the data options `d` (a DataConfig) from
    `split` (default: d.split; a `source:split` suffix wins), and the shape found; the source and
    split read, and what was skipped or noted, are logged (`role`: train, eval)."""
    loaded = formats.load(source, split or d.split, limit, formats.options_from(d))
    base = sources.parse_source(source)[0] if isinstance(source, str) else formats.describe_source(source)
    shown = base if loaded.split is None else f"{base}, split {loaded.split}"
    log.info("%s data: %s: %s", role, shown, loaded.report())
    for reason, message in loaded.examples.items():
        log.warning("skipped %d record(s): %s; the first: %s", loaded.skipped[reason], reason, message)
    for reason, message in loaded.note_examples.items():
        log.warning("%d record(s): %s; the first: %s", loaded.notes[reason], reason, message)
    return loaded.items, loaded.shape


def _same_source(a: str, b: str) -> bool:
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def eval_source(d) -> Optional[tuple[str, Optional[str]]]:
    """(the source evaluation reads, its split or None for a source without splits), or None when
    there is no eval source: data.eval, or data.train's source when only data.eval_split is set.
    The split is data.eval's `:split` suffix, data.eval_split, or the source's one evaluation-like
    split (sources.eval_split): never data.split, and never silently the training split."""
    named_split = getattr(d, "eval_split", None)
    if not d.eval and not named_split:
        return None
    train_base, train_named = sources.parse_source(d.train) if isinstance(d.train, str) else (None, None)
    train_split = train_named or d.split
    base, named = sources.parse_source(d.eval) if d.eval else (train_base, None)
    same = _same_source(base, train_base)
    split = sources.eval_split(base, named or named_split, same, train_split)
    if same and split in (None, train_split):
        what = "the training data" if split is None else f"the training split ({split})"
        log.warning("eval data: %s is %s: evaluation measures examples trained on", base, what)
    return base, split


def check_shape(spec: losses.LossSpec, shape: str, source: str) -> None:
    """A PrefoptError when loss `spec` needs pairs and `shape` is unpaired, or the other way round."""
    if spec.paired and not formats.is_paired(shape):
        raise PrefoptError(
            f"{source}: loss '{spec.name}' needs preference pairs (prompt, chosen, rejected), but the data is "
            f"unpaired (completion + label). Use an unpaired loss ({', '.join(losses.names(paired=False))}) "
            "or give paired data."
        )
    if not spec.paired and formats.is_paired(shape):
        raise PrefoptError(
            f"{source}: loss '{spec.name}' needs unpaired data (prompt, completion, label: true/false, or "
            f"messages + label), but the data holds {shape} pairs. Use a paired loss such as sigmoid, or "
            "give unpaired data."
        )


def _eval_examples(held_out: tuple[str, Optional[str]], d, spec: losses.LossSpec, tokenizer, kw: dict) -> list:
    """The tokenized examples of the eval source `held_out` (source, split)."""
    source, split = held_out
    if d.eval_fraction > 0:
        log.warning("data.eval_fraction %s is not used: data.eval gives the evaluation data", d.eval_fraction)
    eval_pairs, eval_shape = read_data(source, d, split=split, role="eval")
    check_shape(spec, eval_shape, formats.describe_source(source))
    return tokenize_pairs(eval_pairs, tokenizer, **kw)[0]


def load_examples(cfg, tokenizer, spec: losses.LossSpec, progress: bool = True, *, train_data=None, eval_data=None):
    """(train examples, eval examples, tokenization stats) of config `cfg` for loss `spec`:
    data.train read and tokenized; the eval examples from data.eval (or data.eval_split of data.train's
    source; see eval_source), or else a data.eval_fraction of the training examples held out (seeded by
    train.seed). `train_data` / `eval_data` (a datasets.Dataset, a DatasetDict, a list of records) replace
    data.train / data.eval."""
    d = cfg.data
    if d.train is None and train_data is None:
        raise PrefoptError("config: 'data.train' is not set; give a file, a save_to_disk folder or a hub id.")
    if eval_data is not None:
        held_out = (eval_data, getattr(d, "eval_split", None) or "test")
    else:
        held_out = eval_source(d) if train_data is None or d.eval else None  # a wrong eval split fails fast
    source = d.train if train_data is None else train_data
    pairs, shape = read_data(source, d, d.limit, role="train")
    check_shape(spec, shape, formats.describe_source(source))
    kw = dict(
        max_length=d.max_length,
        max_prompt_length=d.max_prompt_length,
        truncation=d.truncation,
        chat_template=d.chat_template,
    )
    train, stats = tokenize_pairs(pairs, tokenizer, progress=progress, **kw)
    eval_examples: list[dict] = []
    if held_out is not None:
        eval_examples = _eval_examples(held_out, d, spec, tokenizer, kw)
    elif d.eval_fraction > 0:
        order = list(range(len(train)))
        random.Random(cfg.train.seed).shuffle(order)
        eval_idx = set(order[: max(1, int(round(len(train) * d.eval_fraction)))])
        eval_examples = [train[i] for i in sorted(eval_idx)]
        train = [ex for i, ex in enumerate(train) if i not in eval_idx]
    if not train:
        raise PrefoptError(f"{formats.describe_source(source)}: no pair is left to train on ({stats.report()}).")
    if spec.kl_baseline:
        attach_kl_completions(train, cfg.train.seed)
        if eval_examples:
            attach_kl_completions(eval_examples, cfg.train.seed)
    return train, eval_examples, stats
