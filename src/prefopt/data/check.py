"""`prefopt data check`: what is in a preference file, and what is wrong with it, before training.

One pass reads every record with the configured options (bad records are collected, not fatal),
tokenizes each example with the configured tokenizer without truncation, and reports: the shape,
counts, token-length distributions, what data.max_length would truncate or drop, duplicates,
chosen == rejected, empty responses, role markers inside responses, transcripts that diverge
before the last turn, text the tokenizer cannot reproduce, and length bias (how often chosen is the longer response). The data is
usable when at least one example survives and no record is bad (or data.on_bad_record is skip).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter

from ..errors import PrefoptError
from . import formats
from .tokenize import PairTokenizer

# Turn markers that do not belong inside a single response.
ROLE_MARKERS = re.compile(r"(\n\n(Human|Assistant|User|System):|<\|im_start\|>|<\|im_end\|>|\[/?INST\]|"
                          r"<\|(start_header_id|eot_id|user|assistant|system)\|>|^(Human|User|Assistant):)",
                          re.MULTILINE)


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

    return {"min": v[0], "mean": round(sum(v) / len(v), 1), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99),
            "max": v[-1]}


def check(source: str, data_cfg, tokenizer, *, tokenizer_name: str = "") -> dict:
    """The report for `source` read with the `data` config section, as a JSON-ready dict."""
    options = dataclasses.replace(formats.options_from(data_cfg), on_bad_record="skip")
    report: dict = {"source": source, "tokenizer": tokenizer_name}
    try:
        loaded = formats.load(source, data_cfg.split, data_cfg.limit, options)
    except PrefoptError as e:  # the file as a whole cannot be read
        report.update(usable=False, error=str(e))
        return report
    items = loaded.items
    unpaired = loaded.shape == "unpaired"
    names = ("completion",) if unpaired else ("chosen", "rejected")
    report.update(shape=loaded.shape, records=loaded.records, examples=len(items),
                  skipped=dict(loaded.skipped), skipped_first=dict(loaded.examples))
    if unpaired:
        labels = Counter(it.label for it in items)
        report["labels"] = {"desirable": labels[True], "undesirable": labels[False]}

    # -- content checks --------------------------------------------------------------------------
    keys = Counter(_key(it) for it in items)
    report["duplicates"] = sum(n - 1 for n in keys.values() if n > 1)
    report["chosen_equals_rejected"] = loaded.skipped.get(formats.SAME_RESPONSES, 0)
    report["empty_responses"] = loaded.skipped.get("empty response", 0)
    report["diverge_before_last_turn"] = loaded.skipped.get("transcripts diverge before the last turn", 0)
    marked = [it.where for it in items if any(ROLE_MARKERS.search(_text_of(getattr(it, n))) for n in names)]
    report["role_markers_in_responses"] = len(marked)
    if marked:
        report["role_markers_first"] = marked[:3]

    # -- tokens ------------------------------------------------------------------------------------
    pt = PairTokenizer(tokenizer, max_length=10**9, max_prompt_length=10**9 - 1,
                       chat_template=data_cfg.chat_template)
    # the configured truncation rule, applied by the same code as in training (its stats count truncations)
    fitter = PairTokenizer(tokenizer, data_cfg.max_length, data_cfg.max_prompt_length, data_cfg.truncation)
    lengths: dict[str, list[int]] = {"prompt": [], **{n: [] for n in names}}
    token_errors: Counter = Counter()
    prompt_cut = chosen_longer = ties = 0
    lossy: list[str] = []  # string examples the tokenizer cannot reproduce (characters it drops or mangles)
    for it in items:
        try:
            ex = pt(it)
        except PrefoptError as e:
            token_errors[str(e).split(": ", 1)[-1]] += 1
            continue
        if not it.conversational:
            texts = [(it.prompt, ex["prompt_ids"])] + [(getattr(it, n), ex[f"{n}_ids"][:-1]) for n in names]
            if any(tokenizer.decode(ids, clean_up_tokenization_spaces=False) != t for t, ids in texts):
                lossy.append(it.where)
        p = len(ex["prompt_ids"])
        rs = [len(ex[f"{n}_ids"]) for n in names]
        lengths["prompt"].append(p)
        for n, r in zip(names, rs):
            lengths[n].append(r)
        fitted = fitter.fit(ex["prompt_ids"], [ex[f"{n}_ids"] for n in names])
        prompt_cut += fitted is not None and len(fitted[0]) < p
        if not unpaired:
            chosen_longer += rs[0] > rs[1]
            ties += rs[0] == rs[1]
    truncated, dropped = fitter.stats.truncated, fitter.stats.dropped_too_long
    report["token_lengths"] = {n: _dist(v) for n, v in lengths.items()}
    report["not_reproduced_by_tokenizer"] = len(lossy)
    if lossy:
        report["not_reproduced_first"] = lossy[:3]
    if token_errors:
        report["tokenization_errors"] = dict(token_errors)
    report["max_length"] = {"max_length": data_cfg.max_length, "max_prompt_length": data_cfg.max_prompt_length,
                            "truncation": data_cfg.truncation, "would_truncate": truncated,
                            "prompts_cut": prompt_cut, "would_drop": dropped}
    tokenized = len(lengths["prompt"])
    if not unpaired and tokenized:
        report["length_bias"] = {"chosen_longer": round(chosen_longer / tokenized, 3),
                                 "same_length": round(ties / tokenized, 3)}

    # -- verdict -----------------------------------------------------------------------------------
    bad_records = sum(n for r, n in loaded.skipped.items() if r not in formats.BENIGN_SKIPS)
    usable_items = tokenized - dropped
    problems, warnings = [], []
    if bad_records and data_cfg.on_bad_record == "error":
        problems.append(f"{bad_records} bad record(s): training stops at the first (data.on_bad_record: skip "
                        "would skip them, counted)")
    if token_errors:
        problems.append(f"{sum(token_errors.values())} example(s) cannot be tokenized")
    if usable_items == 0:
        problems.append("no example is left to train on")
    if bad_records and data_cfg.on_bad_record == "skip":
        warnings.append(f"{bad_records} bad record(s) will be skipped")
    for key, text in (("duplicates", "duplicate example(s)"), ("chosen_equals_rejected", "pair(s) with chosen == "
                      "rejected (skipped)"), ("role_markers_in_responses", "response(s) containing role markers")):
        if report[key]:
            warnings.append(f"{report[key]} {text}")
    if lossy:
        warnings.append(f"{len(lossy)} example(s) hold characters the tokenizer drops or changes (decode(encode(text)) "
                        f"!= text), first: {lossy[0]}")
    if truncated:
        warnings.append(f"{truncated} example(s) exceed max_length {data_cfg.max_length} and will be truncated")
    if dropped:
        warnings.append(f"{dropped} example(s) exceed max_length {data_cfg.max_length} and will be dropped")
    lb = report.get("length_bias")
    if lb and tokenized >= 20 and not 0.3 <= lb["chosen_longer"] <= 0.7:
        warnings.append(f"length bias: chosen is the longer response in {lb['chosen_longer']:.0%} of pairs; a "
                        "policy can learn length instead of quality (consider loss.ld_alpha, or simpo/ipo)")
    if unpaired and items and min(report["labels"].values()) == 0:
        warnings.append("every example has the same label; KTO needs both desirable and undesirable ones")
    report["problems"], report["warnings"] = problems, warnings
    report["usable"] = not problems
    return report


def format_report(r: dict) -> str:
    """The report as text for a terminal."""
    lines = [f"data check: {r['source']}"]
    if "error" in r:
        lines += [f"  cannot read it: {r['error']}", "  verdict: NOT usable"]
        return "\n".join(lines)
    what = "examples" if r["shape"] == "unpaired" else "pairs"
    lines.append(f"  shape: {r['shape']}; {r['records']} records -> {r['examples']} {what}")
    if "labels" in r:
        lines.append(f"  labels: {r['labels']['desirable']} desirable, {r['labels']['undesirable']} undesirable")
    for reason, n in sorted(r["skipped"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  skipped {n}: {reason} (first: {r['skipped_first'][reason]})")
    lines.append(f"  token lengths ({r['tokenizer'] or 'tokenizer'}):")
    for name, d in r["token_lengths"].items():
        if d:
            lines.append(f"    {name:<10} min {d['min']:>5}  mean {d['mean']:>7}  p50 {d['p50']:>5}  p90 {d['p90']:>5}"
                         f"  p99 {d['p99']:>5}  max {d['max']:>5}")
    m = r["max_length"]
    lines.append(f"  max_length {m['max_length']} (prompt {m['max_prompt_length']}, {m['truncation']}): "
                 f"{m['would_truncate']} truncated ({m['prompts_cut']} prompts cut), {m['would_drop']} dropped")
    lines.append(f"  duplicates {r['duplicates']}; chosen == rejected {r['chosen_equals_rejected']}; empty responses "
                 f"{r['empty_responses']}; role markers in responses {r['role_markers_in_responses']}; transcripts "
                 f"diverging before the last turn {r['diverge_before_last_turn']}; text the tokenizer cannot reproduce "
                 f"{r['not_reproduced_by_tokenizer']}")
    if "length_bias" in r:
        lb = r["length_bias"]
        lines.append(f"  length bias: chosen longer in {lb['chosen_longer']:.1%} of pairs "
                     f"(same length {lb['same_length']:.1%})")
    for w in r["warnings"]:
        lines.append(f"  warning: {w}")
    for p in r["problems"]:
        lines.append(f"  problem: {p}")
    lines.append("  verdict: usable" if r["usable"] else "  verdict: NOT usable")
    return "\n".join(lines)
