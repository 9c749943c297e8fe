"""`prefopt data check`: what is in a preference file, and what is wrong with it, before training.

One pass reads every record with the configured options (bad records are collected, not fatal),
tokenizes each example with the configured tokenizer without truncation, and reports: the shape,
counts, token-length distributions, what data.max_length would truncate or drop, duplicates,
chosen == rejected, empty responses, role markers inside responses, transcripts that diverge
before the last turn, text the tokenizer cannot reproduce, and length bias (how often chosen is
the longer response). The data is usable when at least one example survives, no record is bad
(or data.on_bad_record is skip) and, given the loss, it is the kind the loss trains on (pairs or
unpaired examples), by the same rule as training (`examples.check_shape`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from prefopt import losses
from prefopt.data import examples, formats
from prefopt.data.tokenize import PairTokenizer
from prefopt.errors import PrefoptError

# Turn markers that do not belong inside a single response.
ROLE_MARKERS = re.compile(
    r"(\n\n(Human|Assistant|User|System):|<\|im_start\|>|<\|im_end\|>|\[/?INST\]|"
    r"<\|(start_header_id|eot_id|user|assistant|system)\|>|^(Human|User|Assistant):)",
    re.MULTILINE,
)


def _text_of(x) -> str:
    return x if isinstance(x, str) else "\n".join(m["content"] for m in x)


def _key(item) -> str:
    if isinstance(item, formats.Unpaired):
        return json.dumps([item.prompt, item.completion, item.label], sort_keys=True)
    return json.dumps([item.prompt, item.chosen, item.rejected], sort_keys=True)


def _dist(values: list[int]) -> dict:
    if not values:
        return {}
    v = sorted(values)

    def q(p):
        return v[min(len(v) - 1, int(round(p * (len(v) - 1))))]

    return {"min": v[0], "mean": round(sum(v) / len(v), 1), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": v[-1]}


@dataclass
class _Tokens:
    """What tokenizing every example without truncation found."""

    names: tuple  # the response fields: ("chosen", "rejected") or ("completion",)
    lengths: dict  # "prompt" and each response field -> token counts, one per tokenized example
    errors: Counter = field(default_factory=Counter)  # tokenization error -> count
    lossy: list = field(default_factory=list)  # where of string examples the tokenizer cannot reproduce
    prompts_cut: int = 0  # prompts the configured truncation rule would shorten
    chosen_longer: int = 0
    ties: int = 0
    truncated: int = 0
    dropped: int = 0

    @property
    def count(self) -> int:
        """Examples tokenized."""
        return len(self.lengths["prompt"])


def _reproduced(tokenizer, item, ex: dict, names: tuple) -> bool:
    """decode(encode(text)) == text for the prompt and each response of a string example."""
    texts = [(item.prompt, ex["prompt_ids"])] + [(getattr(item, n), ex[f"{n}_ids"][:-1]) for n in names]
    return all(tokenizer.decode(ids, clean_up_tokenization_spaces=False) == t for t, ids in texts)


def _count_lengths(tokens: _Tokens, ex: dict, fitter: PairTokenizer) -> None:
    """Record one tokenized example's lengths, and whether the truncation rule would cut its prompt."""
    p = len(ex["prompt_ids"])
    rs = [len(ex[f"{n}_ids"]) for n in tokens.names]
    tokens.lengths["prompt"].append(p)
    for n, r in zip(tokens.names, rs):
        tokens.lengths[n].append(r)
    fitted = fitter.fit(ex["prompt_ids"], [ex[f"{n}_ids"] for n in tokens.names])
    tokens.prompts_cut += fitted is not None and len(fitted[0]) < p
    if len(rs) == 2:  # a pair: chosen, rejected
        tokens.chosen_longer += rs[0] > rs[1]
        tokens.ties += rs[0] == rs[1]


def _tokenize_all(items: list, names: tuple, data_cfg, tokenizer) -> _Tokens:
    """Tokenize every example without truncation, and apply the configured truncation rule to count its effect."""
    pt = PairTokenizer(tokenizer, max_length=10**9, max_prompt_length=10**9 - 1, chat_template=data_cfg.chat_template)
    # the configured truncation rule, applied by the same code as in training (its stats count truncations)
    fitter = PairTokenizer(tokenizer, data_cfg.max_length, data_cfg.max_prompt_length, data_cfg.truncation)
    tokens = _Tokens(names, {"prompt": [], **{n: [] for n in names}})
    for it in items:
        try:
            ex = pt(it)
        except PrefoptError as e:
            tokens.errors[str(e).split(": ", 1)[-1]] += 1
            continue
        if not it.conversational and not _reproduced(tokenizer, it, ex, names):
            tokens.lossy.append(it.where)
        _count_lengths(tokens, ex, fitter)
    tokens.truncated, tokens.dropped = fitter.stats.truncated, fitter.stats.dropped_too_long
    return tokens


def _counts(loaded: formats.Loaded) -> dict:
    """Shape, records, examples, skips (and labels, for unpaired data)."""
    out = {
        "shape": loaded.shape,
        "records": loaded.records,
        "examples": len(loaded.items),
        "skipped": dict(loaded.skipped),
        "skipped_first": dict(loaded.examples),
        "notes": dict(loaded.notes),
        "notes_first": dict(loaded.note_examples),
    }
    if loaded.split is not None:
        out["split"] = loaded.split
    if not loaded.paired:
        labels = Counter(it.label for it in loaded.items)
        out["labels"] = {"desirable": labels[True], "undesirable": labels[False]}
    return out


def _content(loaded: formats.Loaded, names: tuple) -> dict:
    """Duplicates, chosen == rejected, empty responses, diverging transcripts, role markers in responses."""
    items = loaded.items
    keys = Counter(_key(it) for it in items)
    out = {
        "duplicates": sum(n - 1 for n in keys.values() if n > 1),
        "chosen_equals_rejected": loaded.skipped.get(formats.SAME_RESPONSES, 0),
        "empty_responses": loaded.skipped.get("empty response", 0),
        "diverge_before_last_turn": loaded.skipped.get("transcripts diverge before the last turn", 0),
    }
    marked = [it.where for it in items if any(ROLE_MARKERS.search(_text_of(getattr(it, n))) for n in names)]
    out["role_markers_in_responses"] = len(marked)
    if marked:
        out["role_markers_first"] = marked[:3]
    return out


def _token_report(tokens: _Tokens, data_cfg) -> dict:
    """Token-length distributions, what max_length would do, and length bias (pairs only)."""
    out: dict = {"token_lengths": {n: _dist(v) for n, v in tokens.lengths.items()}}
    out["not_reproduced_by_tokenizer"] = len(tokens.lossy)
    if tokens.lossy:
        out["not_reproduced_first"] = tokens.lossy[:3]
    if tokens.errors:
        out["tokenization_errors"] = dict(tokens.errors)
    out["max_length"] = {
        "max_length": data_cfg.max_length,
        "max_prompt_length": data_cfg.max_prompt_length,
        "truncation": data_cfg.truncation,
        "would_truncate": tokens.truncated,
        "prompts_cut": tokens.prompts_cut,
        "would_drop": tokens.dropped,
    }
    if len(tokens.names) == 2 and tokens.count:
        out["length_bias"] = {
            "chosen_longer": round(tokens.chosen_longer / tokens.count, 3),
            "same_length": round(tokens.ties / tokens.count, 3),
        }
    return out


def _bad_records(loaded: formats.Loaded) -> int:
    return sum(n for r, n in loaded.skipped.items() if r not in formats.BENIGN_SKIPS)


def _first_bad_record(loaded: formats.Loaded) -> str:
    """The message of the first bad record read (the first reason counted keeps its first message)."""
    return next(m for r, m in loaded.examples.items() if r not in formats.BENIGN_SKIPS)


def _shape_problem(loaded: formats.Loaded, loss: Optional[losses.LossSpec], source: str) -> list[str]:
    """Training's refusal when `loss` needs pairs and the data is unpaired, or the other way round."""
    if loss is None or loaded.shape not in formats.SHAPES:
        return []
    try:
        examples.check_shape(loss, loaded.shape, source)
    except PrefoptError as e:
        return [str(e).removeprefix(f"{source}: ").rstrip(".") + " (loss.name sets the loss)"]
    return []


def _problems(loaded: formats.Loaded, tokens: _Tokens, data_cfg) -> list[str]:
    """What makes the data unusable as configured."""
    bad_records = _bad_records(loaded)
    problems = []
    if bad_records and data_cfg.on_bad_record == "error":
        problems.append(
            f"{bad_records} bad record(s): training stops at the first (data.on_bad_record: skip "
            f"would skip them, counted); the first: {_first_bad_record(loaded)}"
        )
    if tokens.errors:
        problems.append(f"{sum(tokens.errors.values())} example(s) cannot be tokenized")
    if tokens.count - tokens.dropped == 0:
        problems.append("no example is left to train on")
    return problems


def _warnings(report: dict, loaded: formats.Loaded, tokens: _Tokens, data_cfg) -> list[str]:
    """What training would survive but should be looked at."""
    bad_records = _bad_records(loaded)
    warnings = []
    if bad_records and data_cfg.on_bad_record == "skip":
        warnings.append(f"{bad_records} bad record(s) will be skipped")
    for reason, n in loaded.notes.most_common():
        warnings.append(f"{n} record(s): {reason}; the first: {loaded.note_examples[reason]}")
    for key, text in (
        ("duplicates", "duplicate example(s)"),
        ("chosen_equals_rejected", "pair(s) with chosen == rejected (skipped)"),
        ("role_markers_in_responses", "response(s) containing role markers"),
    ):
        if report[key]:
            warnings.append(f"{report[key]} {text}")
    if tokens.lossy:
        warnings.append(
            f"{len(tokens.lossy)} example(s) hold characters the tokenizer drops or changes (decode(encode(text)) "
            f"!= text), first: {tokens.lossy[0]}"
        )
    if tokens.truncated:
        warnings.append(f"{tokens.truncated} example(s) exceed max_length {data_cfg.max_length} and will be truncated")
    if tokens.dropped:
        warnings.append(f"{tokens.dropped} example(s) exceed max_length {data_cfg.max_length} and will be dropped")
    return warnings + _data_warnings(report, loaded, tokens)


def _data_warnings(report: dict, loaded: formats.Loaded, tokens: _Tokens) -> list[str]:
    """Length bias in pairs; a single label in unpaired data."""
    warnings = []
    lb = report.get("length_bias")
    if lb and tokens.count >= 20 and not 0.3 <= lb["chosen_longer"] <= 0.7:
        warnings.append(
            f"length bias: chosen is the longer response in {lb['chosen_longer']:.0%} of pairs; a "
            "policy can learn length instead of quality (consider loss.ld_alpha, or simpo/ipo)"
        )
    if not loaded.paired and loaded.items and min(report["labels"].values()) == 0:
        warnings.append("every example has the same label; KTO needs both desirable and undesirable ones")
    return warnings


def check(
    source: str, data_cfg, tokenizer, *, tokenizer_name: str = "", loss: Optional[losses.LossSpec] = None
) -> dict:
    """The report for `source` read with the `data` config section, as a JSON-ready dict. With `loss`
    (the config's LossSpec), data of the other kind (unpaired for a paired loss, or the reverse) is a problem."""
    options = dataclasses.replace(formats.options_from(data_cfg), on_bad_record="skip")
    report: dict = {"source": source, "tokenizer": tokenizer_name}
    try:
        loaded = formats.load(source, data_cfg.split, data_cfg.limit, options)
    except PrefoptError as e:  # the file as a whole cannot be read
        report.update(usable=False, error=str(e))
        return report
    names = ("chosen", "rejected") if loaded.paired else ("completion",)
    report.update(_counts(loaded))
    report.update(_content(loaded, names))
    tokens = _tokenize_all(loaded.items, names, data_cfg, tokenizer)
    report.update(_token_report(tokens, data_cfg))
    report["problems"] = _shape_problem(loaded, loss, source) + _problems(loaded, tokens, data_cfg)
    report["warnings"] = _warnings(report, loaded, tokens, data_cfg)
    report["usable"] = not report["problems"]
    return report


def format_report(r: dict) -> str:
    """The report as text for a terminal."""
    lines = [f"data check: {r['source']}"]
    if "error" in r:
        lines += [f"  cannot read it: {r['error']}", "  verdict: NOT usable"]
        return "\n".join(lines)
    what = "pairs" if formats.is_paired(r["shape"]) else "examples"
    split = f" (split {r['split']})" if "split" in r else ""
    lines.append(f"  shape: {r['shape']}; {r['records']} records{split} -> {r['examples']} {what}")
    if "labels" in r:
        lines.append(f"  labels: {r['labels']['desirable']} desirable, {r['labels']['undesirable']} undesirable")
    for reason, n in sorted(r["skipped"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  skipped {n}: {reason} (first: {r['skipped_first'][reason]})")
    lines.append(f"  token lengths ({r['tokenizer'] or 'tokenizer'}):")
    for name, d in r["token_lengths"].items():
        if d:
            lines.append(
                f"    {name:<10} min {d['min']:>5}  mean {d['mean']:>7}  p50 {d['p50']:>5}  p90 {d['p90']:>5}"
                f"  p99 {d['p99']:>5}  max {d['max']:>5}"
            )
    m = r["max_length"]
    lines.append(
        f"  max_length {m['max_length']} (prompt {m['max_prompt_length']}, {m['truncation']}): "
        f"{m['would_truncate']} truncated ({m['prompts_cut']} prompts cut), {m['would_drop']} dropped"
    )
    lines.append(
        f"  duplicates {r['duplicates']}; chosen == rejected {r['chosen_equals_rejected']}; empty responses "
        f"{r['empty_responses']}; role markers in responses {r['role_markers_in_responses']}; transcripts "
        f"diverging before the last turn {r['diverge_before_last_turn']}; text the tokenizer cannot reproduce "
        f"{r['not_reproduced_by_tokenizer']}"
    )
    if "length_bias" in r:
        lb = r["length_bias"]
        lines.append(
            f"  length bias: chosen longer in {lb['chosen_longer']:.1%} of pairs (same length {lb['same_length']:.1%})"
        )
    for w in r["warnings"]:
        lines.append(f"  warning: {w}")
    for p in r["problems"]:
        lines.append(f"  problem: {p}")
    lines.append("  verdict: usable" if r["usable"] else "  verdict: NOT usable")
    return "\n".join(lines)
