"""A trained model as a reward model: implicit rewards on held-out (or training) preference data.

"Your language model is secretly a reward model" (Rafailov et al. 2023): after DPO the policy π
and its reference π_ref define a reward for any prompt x and response y,

    r(x, y) = β·(log π(y|x) − log π_ref(y|x))          losses with a reference (DPO, IPO, KTO, ...)
    r(x, y) = β·log π(y|x)                              reference-free losses (CPO, ORPO, ...)

with log π(y|x) the summed log-probability of the response tokens (EOS included) after the
prompt, and β the run's loss.beta (1 for a loss without one). Losses whose margin is built from
per-token log-ratios use the per-token form, |y| the number of response tokens:

    r(x, y) = β/|y|·log π(y|x)                          SimPO (its reward, eq. 4 of Meng et al. 2024)
    r(x, y) = β/|y|·(log π(y|x) − log π_ref(y|x))       sigmoid_norm, IPO with ipo_normalize

Paired data (x, y_c, y_r) gives

    reward accuracy      mean of 1[r_c > r_r] (ties count ½)
    margin               r_c − r_r: mean and sd over the pairs
    chosen / rejected    mean, sd and the 10/50/90 % quantiles of r_c and of r_r
    likelihood accuracy  mean of 1[log π(y_c) > log π(y_r)] (ties ½), summed and per token
                         (log π(y)/|y|), for the policy and, as the baseline, for the reference:
                         how often the model before training already ranked the pair right

Unpaired data (x, y, label) gives the accuracy of the reward's sign against the labels
(1[r > 0] = label, r = 0 counts ½), the mean reward of the desirable and of the undesirable
examples and their counts, and the threshold-free AUC P[r_desirable > r_undesirable] (ties ½) of
the reward and, as baselines, of the per-token likelihood under the policy and the reference.

Everything runs in float32 under torch.no_grad (never bf16 autocast: the figures are exact), with
the run's data options (fields, shape, truncation, chat template) and its collator layout.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from prefopt import losses
from prefopt.data import formats
from prefopt.data.tokenize import PairTokenizer
from prefopt.errors import PrefoptError
from prefopt.evaluation.trained import load_trained
from prefopt.files import write_text_atomic
from prefopt.modeling import load
from prefopt.modeling.reference import per_response
from prefopt.training.setup import make_collator


def rewards_of(trained, logps: torch.Tensor, ref_logps: Optional[torch.Tensor], lengths: torch.Tensor) -> torch.Tensor:
    """The implicit rewards (float64, the shape of `logps`) of `trained`'s loss: the same
    losses.implicit_rewards the training log uses."""
    return losses.implicit_rewards(
        trained.spec, trained.hyper, logps.double(), None if ref_logps is None else ref_logps.double(), lengths.double()
    )


# --------------------------------------------------------------------------------------------
# log-probs
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def sequence_table(
    model,
    examples: list[dict],
    collator,
    *,
    batch_size: int = 8,
    chunk: int = 1024,
    progress: bool = False,
    desc: str = "policy log-probs",
) -> dict:
    """{"logps", "lengths"}: [len(examples), K] float64 summed log-probs and token counts of every
    response under `model` as it is (a peft model's adapter on, unless the caller disabled it),
    in float32. K = 2 for pairs (chosen, rejected), 1 for unpaired completions."""
    return per_response(
        model,
        examples,
        collator,
        {"logps": "logps", "lengths": "lengths"},
        adapter_off=False,
        batch_size=batch_size,
        chunk=chunk,
        progress=progress,
        desc=desc,
    )


def _reference_model(trained):
    """A context manager yielding the reference, or None when there is none to compare with.
    A reference-free full fine-tune has no reference loaded: its starting point, the base model
    named in the config, is loaded here for the likelihood baseline."""
    if trained.ref_model is not None or hasattr(trained.model, "disable_adapter"):
        return trained.reference()
    cfg = trained.cfg.model
    base = load.load_configured(load.resolve(cfg.name), cfg, trust_remote_code=trained.trust_remote_code)
    base.requires_grad_(False).eval().to(next(trained.model.parameters()).device)
    return contextlib.nullcontext(base)


# --------------------------------------------------------------------------------------------
# data -> scored examples
# --------------------------------------------------------------------------------------------


@dataclass
class Scored:
    """The examples of a data file scored under a trained model: log-probs, lengths and rewards."""

    trained: object
    shape: str  # "paired" or "unpaired"
    items: list  # the Pair / Unpaired records read
    index: list[int]  # items[index[n]] is examples[n] (too-long records dropped under truncation: drop)
    truncated: list[bool]  # per example
    examples: list[dict]
    logps: torch.Tensor  # [N, K] policy
    ref_logps: torch.Tensor  # [N, K] reference
    lengths: torch.Tensor  # [N, K] response tokens
    rewards: torch.Tensor  # [N, K]
    reading: dict  # records read / skipped / truncated / dropped


def score_examples(trained, data_path: str, *, batch_size: int = 8, progress: bool = True) -> Scored:
    """Read `data_path` with the run's data options, tokenize like training did and compute policy
    and reference log-probs and the implicit rewards of every response."""
    if batch_size < 1:
        raise PrefoptError(f"batch size must be >= 1, found {batch_size}.")
    loaded, shape = _read_data(trained, data_path)
    examples, index, truncated, reading = _tokenize(trained, loaded, data_path)
    logps, ref_logps, lengths = _logps_of(trained, examples, batch_size=batch_size, progress=progress)
    rewards = rewards_of(trained, logps, ref_logps, lengths)
    return Scored(trained, shape, loaded.items, index, truncated, examples, logps, ref_logps, lengths, rewards, reading)


def _read_data(trained, data_path: str):
    """The records of `data_path` read with the run's data options, and their shape ("paired" or
    "unpaired"), checked to be the shape the run's loss was trained on."""
    loaded = formats.load(data_path, trained.cfg.data.split, None, formats.options_from(trained.cfg.data))
    shape = "unpaired" if loaded.shape == "unpaired" else "paired"
    if not loaded.items:
        raise PrefoptError(f"{data_path}: no usable record ({loaded.report()}).")
    if trained.spec.paired != (shape == "paired"):
        want = (
            "preference pairs (prompt, chosen, rejected)"
            if trained.spec.paired
            else "unpaired examples (prompt, completion, label)"
        )
        raise PrefoptError(
            f"{data_path}: holds {loaded.shape} data, but the model was trained with loss "
            f"'{trained.spec.name}' on {want}; its implicit reward is defined for that shape only."
        )
    return loaded, shape


def _tokenize(trained, loaded, data_path: str):
    """(examples, index, truncated, reading): the items of `loaded` tokenized like training did,
    the index of each among the items, whether it was truncated, and the reading counts."""
    d = trained.cfg.data
    pt = PairTokenizer(trained.tokenizer, d.max_length, d.max_prompt_length, d.truncation, d.chat_template)
    examples, index, truncated = [], [], []
    for i, item in enumerate(loaded.items):
        before = pt.stats.truncated
        ex = pt(item)
        if ex is None:
            continue
        examples.append(ex)
        index.append(i)
        truncated.append(pt.stats.truncated > before)
    reading = {
        "records": loaded.records,
        "items": len(loaded.items),
        "skipped": sum(loaded.skipped.values()),
        "skipped_by_reason": dict(loaded.skipped),
        "scored": len(examples),
        "truncated": pt.stats.truncated,
        "dropped_too_long": pt.stats.dropped_too_long,
    }
    if not examples:
        raise PrefoptError(
            f"{data_path}: every record is longer than data.max_length = {d.max_length} and "
            "data.truncation is 'drop'; nothing to score."
        )
    return examples, index, truncated, reading


def _logps_of(trained, examples: list[dict], *, batch_size: int = 8, progress: bool = False):
    """(policy log-probs, reference log-probs, response lengths) of `examples`, each [N, K], with
    the run's collator layout and plain whole-response sums."""
    collator = make_collator(trained.cfg, trained.tokenizer)
    collator.subset = None  # plain sums: the implicit reward is defined on whole responses
    kw = dict(batch_size=batch_size, chunk=trained.cfg.train.lm_head_chunk, progress=progress)
    pol = sequence_table(trained.model, examples, collator, desc="policy log-probs", **kw)
    with _reference_model(trained) as ref_model:
        ref = sequence_table(ref_model, examples, collator, desc="reference log-probs", **kw)
    return pol["logps"], ref["logps"], pol["lengths"]


def _move_to_device(trained) -> None:
    if torch.cuda.is_available():
        trained.model.to("cuda")
        if trained.ref_model is not None:
            trained.ref_model.to("cuda")


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def _wins(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 where a > b, ½ where equal, 0 else."""
    return (a > b).double() + 0.5 * (a == b).double()


def _rate(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(_wins(a, b).mean())


def _summary(x: torch.Tensor) -> dict:
    x = x.double()
    q = torch.quantile(x, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {
        "mean": float(x.mean()),
        "sd": float(x.std()) if x.numel() > 1 else 0.0,
        "p10": float(q[0]),
        "p50": float(q[1]),
        "p90": float(q[2]),
    }


def _likelihood(logps: torch.Tensor, lengths: torch.Tensor) -> dict:
    mean = logps / lengths.clamp(min=1)
    return {
        "likelihood_accuracy": _rate(logps[:, 0], logps[:, 1]),
        "likelihood_accuracy_per_token": _rate(mean[:, 0], mean[:, 1]),
        "logp_chosen_mean": float(logps[:, 0].mean()),
        "logp_rejected_mean": float(logps[:, 1].mean()),
    }


def pair_metrics(trained, examples, *, logps=None, ref_logps=None, lengths=None) -> dict:
    """Metrics of paired `examples` (tokenized pairs) under `trained` (see the module docstring).
    The log-probs are computed unless given as [N, 2] tensors (chosen, rejected)."""
    if logps is None:
        logps, ref_logps, lengths = _logps_of(trained, examples)
    r = rewards_of(trained, logps, ref_logps, lengths)
    margin = r[:, 0] - r[:, 1]
    return {
        "pairs": int(r.shape[0]),
        "policy": {
            "reward_accuracy": _rate(r[:, 0], r[:, 1]),
            "margin_mean": float(margin.mean()),
            "margin_sd": float(margin.std()) if len(margin) > 1 else 0.0,
            "reward_chosen": _summary(r[:, 0]),
            "reward_rejected": _summary(r[:, 1]),
            **_likelihood(logps, lengths),
        },
        "reference": _likelihood(ref_logps, lengths),
        "tokens": {"chosen_mean": float(lengths[:, 0].mean()), "rejected_mean": float(lengths[:, 1].mean())},
    }


def _auc(pos: torch.Tensor, neg: torch.Tensor) -> Optional[float]:
    """P[pos > neg] over all (pos, neg) pairs, ties ½; None without both classes."""
    if not len(pos) or not len(neg):
        return None
    return float(_wins(pos[:, None], neg[None, :]).mean())


def unpaired_metrics(trained, examples, *, logps=None, ref_logps=None, lengths=None) -> dict:
    """Metrics of unpaired `examples` (tokenized, with labels) under `trained`."""
    if logps is None:
        logps, ref_logps, lengths = _logps_of(trained, examples)
    r = rewards_of(trained, logps, ref_logps, lengths)[:, 0]
    label = torch.tensor([bool(ex["label"]) for ex in examples])
    sign = (r > 0).double() + 0.5 * (r == 0).double()
    correct = torch.where(label, sign, 1 - sign)
    mean_pol = (logps / lengths.clamp(min=1))[:, 0]
    mean_ref = (ref_logps / lengths.clamp(min=1))[:, 0]

    def mean(x):
        """Mean of `x`; None when empty."""
        return float(x.mean()) if len(x) else None

    return {
        "examples": len(examples),
        "desirable": int(label.sum()),
        "undesirable": int((~label).sum()),
        "policy": {
            "sign_accuracy": float(correct.mean()),
            "reward_desirable_mean": mean(r[label]),
            "reward_undesirable_mean": mean(r[~label]),
            "reward_auc": _auc(r[label], r[~label]),
            "likelihood_auc_per_token": _auc(mean_pol[label], mean_pol[~label]),
        },
        "reference": {"likelihood_auc_per_token": _auc(mean_ref[label], mean_ref[~label])},
    }


def _metrics(scored: Scored) -> dict:
    kw = dict(logps=scored.logps, ref_logps=scored.ref_logps, lengths=scored.lengths)
    fn = pair_metrics if scored.shape == "paired" else unpaired_metrics
    return fn(scored.trained, scored.examples, **kw)


def _header(trained, model_dir: str, data_path: str, scored: Scored) -> dict:
    return {
        "model": str(model_dir),
        "data": str(data_path),
        "loss": trained.spec.name,
        "beta": trained.beta,
        "reward": losses.reward_formula(trained.spec, trained.hyper),
        "shape": scored.shape,
        "read": scored.reading,
    }


# --------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------


def evaluate_data(
    model_dir: str, data_path: str, batch_size: int = 8, progress: bool = True, trust_remote_code: bool = False
) -> dict:
    """`prefopt eval --model OUT --data PATH`: the metrics of the module docstring, with the model,
    data, loss, β, reward formula and what was read / skipped / truncated. `trust_remote_code` is
    the caller's decision (see load_trained)."""
    trained = load_trained(model_dir, trust_remote_code=trust_remote_code)
    _move_to_device(trained)
    scored = score_examples(trained, data_path, batch_size=batch_size, progress=progress)
    return {**_header(trained, model_dir, data_path, scored), **_metrics(scored)}


def default_scores_path(model_dir: str, data_path: str) -> Path:
    """OUT/scores/<data name>.jsonl: inside the model folder, never beside the user's data."""
    name = Path(str(data_path).rstrip("/\\")).name or "data"
    for suffix in (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "data"
    return Path(model_dir) / "scores" / f"{name}.jsonl"


def score_data(
    model_dir: str,
    data_path: str,
    out_path: Optional[str] = None,
    batch_size: int = 8,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> dict:
    """`prefopt score`: one JSON line per (prompt, response) with its implicit reward, written to
    `out_path` (default OUT/scores/<data name>.jsonl). Pairs give two lines, role "chosen" then
    "rejected"; unpaired data one line with its "label". "record" is the 0-based index of the pair
    (or example) among those read from the data; "prompt" / "response" are the texts as read (a
    list of messages for conversational data); "truncated" says the scored tokens were cut to fit
    data.max_length. Returns the path, the number of lines and the metrics of evaluate_data. The
    file is never one of the inputs (see check_scores_path)."""
    out = Path(out_path) if out_path else default_scores_path(model_dir, data_path)
    check_scores_path(out, data_path, [Path(model_dir)])
    trained = load_trained(model_dir, trust_remote_code=trust_remote_code)
    base = Path(load.resolve(trained.cfg.model.name))
    check_scores_path(out, data_path, [base] if base.is_dir() else [])
    _move_to_device(trained)
    scored = score_examples(trained, data_path, batch_size=batch_size, progress=progress)
    roles = ("chosen", "rejected") if scored.shape == "paired" else ("completion",)
    lines = []
    for n, i in enumerate(scored.index):
        item = scored.items[i]
        for k, role in enumerate(roles):
            row = {"record": i, "where": item.where, "role": role, "prompt": item.prompt}
            row["response"] = getattr(item, role)
            if scored.shape == "unpaired":
                row["label"] = bool(item.label)
            row.update(
                reward=_num(scored.rewards[n, k]),
                logp=_num(scored.logps[n, k]),
                ref_logp=_num(scored.ref_logps[n, k]),
                tokens=int(scored.lengths[n, k]),
                truncated=scored.truncated[n],
            )
            lines.append(json.dumps(row, ensure_ascii=False))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, "".join(line + "\n" for line in lines))
    except OSError as e:
        raise PrefoptError(f"{out}: cannot write the scores: {e.strerror or e}.") from None
    return {"out": str(out), "lines": len(lines), **_header(trained, model_dir, data_path, scored), **_metrics(scored)}


def check_scores_path(out: Path, data_path: str, model_dirs: list) -> None:
    """A PrefoptError when writing the scores to `out` would destroy an input: `out` is a folder, the
    data file (or inside a data folder), or an existing file of one of `model_dirs` (or of the run
    folder of a checkpoint) other than those in its scores/ folder."""
    if out.is_dir():
        raise PrefoptError(f"{out}: is a folder; --out takes the JSONL file to write the scores to.")
    data = Path(data_path)
    if data.exists() and (_same_file(out, data) or (data.is_dir() and _inside(out, data))):
        raise PrefoptError(
            f"{out}: is the data file given with --data ({data_path}); the scores never overwrite their input: "
            "give another --out file, or omit --out (default OUT/scores/<data name>.jsonl)."
        )
    folders = list(model_dirs)
    folders += [m.parent for m in model_dirs if (m.parent / "prefopt.yaml").is_file()]  # a checkpoint's run
    for folder in folders:
        if out.exists() and _inside(out, folder) and not _inside(out, folder / "scores"):
            raise PrefoptError(
                f"{out}: is a file of the model folder {folder}; the scores never overwrite a model's files: "
                "give another --out file, or omit --out (default OUT/scores/<data name>.jsonl)."
            )


def _same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` are the same file (links and relative paths resolved)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return a.resolve() == b.resolve()


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` is in `folder` or below it (links resolved)."""
    return path.resolve().is_relative_to(folder.resolve())


def _num(x) -> float:
    v = float(x)
    return v if math.isfinite(v) else None


# --------------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------------


def _f(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) < 1e5 else f"{x:.3g}"
    return str(x)


def format_report(m: dict) -> str:
    """The metrics of evaluate_data as an aligned table: policy beside the reference baseline."""
    rows = _paired_rows(m) if m["shape"] == "paired" else _unpaired_rows(m)
    w = max(len(name) for name, _, _ in rows)
    lines = _reading_lines(m)
    lines.append(f"{'':{w}}  {'policy':>10}  {'reference':>10}")
    lines += [f"{name:{w}}  {_f(a):>10}  {_f(b):>10}" for name, a, b in rows]
    if m["shape"] == "paired":
        lines += _reward_quantile_lines(m, w)
    else:
        lines += ["", f"{m['examples']} examples: {m['desirable']} desirable, {m['undesirable']} undesirable"]
    return "\n".join(lines)


def _reading_lines(m: dict) -> list[str]:
    """The model and loss line, the data line (what was read / skipped / truncated), a blank."""
    r = m["read"]
    skipped = (
        f", {r['skipped']} skipped ({', '.join(f'{n} {k}' for k, n in r['skipped_by_reason'].items())})"
        if r["skipped"]
        else ", 0 skipped"
    )
    unit = "pairs" if m["shape"] == "paired" else "examples"
    return [
        f"model   {m['model']}   loss {m['loss']}, β = {m['beta']:g}, reward r = {m['reward']}",
        f"data    {m['data']}: {r['records']} records, {r['items']} {unit}{skipped}, {r['truncated']} truncated"
        + (f", {r['dropped_too_long']} dropped as too long" if r["dropped_too_long"] else "")
        + f"; {r['scored']} scored",
        "",
    ]


def _paired_rows(m: dict) -> list[tuple]:
    """(name, policy, reference) rows of the paired metrics."""
    pol, ref = m["policy"], m["reference"]
    return [
        ("reward accuracy (r_c > r_r)", pol["reward_accuracy"], None),
        ("reward margin r_c − r_r, mean", pol["margin_mean"], None),
        ("reward margin, sd", pol["margin_sd"], None),
        ("likelihood accuracy (sum log p)", pol["likelihood_accuracy"], ref["likelihood_accuracy"]),
        ("likelihood accuracy (per token)", pol["likelihood_accuracy_per_token"], ref["likelihood_accuracy_per_token"]),
        ("mean log p chosen", pol["logp_chosen_mean"], ref["logp_chosen_mean"]),
        ("mean log p rejected", pol["logp_rejected_mean"], ref["logp_rejected_mean"]),
    ]


def _unpaired_rows(m: dict) -> list[tuple]:
    """(name, policy, reference) rows of the unpaired metrics."""
    pol, ref = m["policy"], m["reference"]
    return [
        ("sign accuracy (r > 0 ⇔ desirable)", pol["sign_accuracy"], None),
        ("reward AUC (desirable > undesirable)", pol["reward_auc"], None),
        ("mean reward, desirable", pol["reward_desirable_mean"], None),
        ("mean reward, undesirable", pol["reward_undesirable_mean"], None),
        ("likelihood AUC (per token)", pol["likelihood_auc_per_token"], ref["likelihood_auc_per_token"]),
    ]


def _reward_quantile_lines(m: dict, w: int) -> list[str]:
    """The reward distribution of chosen and rejected (mean, sd, quantiles) and the pair count."""
    stats = ("mean", "sd", "p10", "p50", "p90")
    lines = ["", f"{'rewards':{w}}  " + "  ".join(f"{k:>8}" for k in stats)]
    for role in ("chosen", "rejected"):
        s = m["policy"][f"reward_{role}"]
        name = "  " + role
        lines.append(f"{name:{w}}  " + "  ".join(f"{_f(s[k]):>8}" for k in stats))
    return lines + [
        "",
        f"{m['pairs']} pairs; mean response tokens: chosen {m['tokens']['chosen_mean']:.1f}, "
        f"rejected {m['tokens']['rejected_mean']:.1f}",
    ]
