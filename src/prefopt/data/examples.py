"""A config's data, read and tokenized for a loss: the training examples and the held-out ones.

read_data      one source (file, folder, hub id) -> pairs or unpaired records, skips counted
check_shape    the loss and the data agree on paired vs unpaired
load_examples  train (and eval) sources -> tokenized examples, KL completions where the loss
               needs a baseline
"""

from __future__ import annotations

import logging
import random

from prefopt import losses
from prefopt.data import formats
from prefopt.data.tokenize import attach_kl_completions, tokenize_pairs
from prefopt.errors import PrefoptError

log = logging.getLogger("prefopt")


def read_data(source: str, d, limit=None) -> tuple[list, str]:
    """Pairs (or unpaired examples) of `source` read with the data options `d` (a DataConfig),
    and the shape found; what was skipped is logged, counted by reason."""
    loaded = formats.load(source, d.split, limit, formats.options_from(d))
    log.info("%s: %s", source, loaded.report())
    for reason, message in loaded.examples.items():
        log.warning("skipped %d record(s): %s; the first: %s", loaded.skipped[reason], reason, message)
    return loaded.items, loaded.shape


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


def load_examples(cfg, tokenizer, spec: losses.LossSpec, progress: bool = True):
    """(train examples, eval examples, tokenization stats) of config `cfg` for loss `spec`:
    data.train read and tokenized; the eval examples from data.eval, or a data.eval_fraction of
    the training examples held out (seeded by train.seed)."""
    d = cfg.data
    if d.train is None:
        raise PrefoptError("config: 'data.train' is not set; give a file, a save_to_disk folder or a hub id.")
    pairs, shape = read_data(d.train, d, d.limit)
    check_shape(spec, shape, d.train)
    kw = dict(
        max_length=d.max_length,
        max_prompt_length=d.max_prompt_length,
        truncation=d.truncation,
        chat_template=d.chat_template,
    )
    train, stats = tokenize_pairs(pairs, tokenizer, progress=progress, **kw)
    eval_examples: list[dict] = []
    if d.eval:
        eval_pairs, eval_shape = read_data(d.eval, d)
        check_shape(spec, eval_shape, d.eval)
        eval_examples, _ = tokenize_pairs(eval_pairs, tokenizer, **kw)
    elif d.eval_fraction > 0:
        order = list(range(len(train)))
        random.Random(cfg.train.seed).shuffle(order)
        eval_idx = set(order[: max(1, int(round(len(train) * d.eval_fraction)))])
        eval_examples = [train[i] for i in sorted(eval_idx)]
        train = [ex for i, ex in enumerate(train) if i not in eval_idx]
    if not train:
        raise PrefoptError(f"{d.train}: no pair is left to train on ({stats.report()}).")
    if spec.kl_baseline:
        attach_kl_completions(train, cfg.train.seed)
        if eval_examples:
            attach_kl_completions(eval_examples, cfg.train.seed)
    return train, eval_examples, stats
