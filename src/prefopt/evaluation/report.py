"""`prefopt report OUTDIR`: a static HTML page with the plots of a finished (or running) training run.

Reads OUTDIR/metrics.jsonl (one JSON object per logged step: train lines, `eval_`-prefixed eval
lines and a final summary line with `train_runtime`, `train_loss`, ...) and, when present,
OUTDIR/prefopt.yaml (the resolved config). Writes OUTDIR/report/index.html: one self-contained file
(every plot embedded as a PNG data URI, no other file referenced), so it can be mailed or attached
as it is and opened in any browser.

A step logged twice (a resumed run) counts once: the last line for a given (step, kind) wins.
Each plot is drawn only when its metrics were logged, so paired (DPO-style), unpaired (KTO-style)
and reference-free runs all get the plots that make sense for them.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import yaml
from matplotlib.figure import Figure

from prefopt.errors import PrefoptError
from prefopt.files import write_text_atomic

SMOOTH_ABOVE = 20  # more train points than this: raw line thin and faint, EMA drawn on top
GREEN, RED, BLUE, ORANGE, GREY = "#2a9d5c", "#d1495b", "#3366cc", "#e69f00", "#555555"

# A line plot: file stem, title, y label, caption, lines (metric key, label, colour, linestyle),
# whether to smooth. Keys starting with "eval_" come from eval lines, the others from train lines.
PLOTS = [
    (
        "loss",
        "Loss",
        "loss",
        "Training loss per step (faint) with its moving average, eval loss as dots. "
        "For DPO it starts at ln 2 = 0.693; it should fall, and eval should follow train.",
        [("loss", "train", BLUE, "-"), ("eval_loss", "eval", ORANGE, "-")],
        True,
    ),
    (
        "accuracy",
        "Reward accuracy",
        "accuracy",
        "Fraction of examples the implicit reward ranks (paired) or "
        "signs (unpaired) correctly; 0.5 is chance. Near 1.0 early on can mean the task is too easy.",
        [("rewards/accuracies", "train", BLUE, "-"), ("eval_rewards/accuracies", "eval", ORANGE, "-")],
        True,
    ),
    (
        "margins",
        "Reward margin",
        "chosen − rejected",
        "Mean implicit-reward margin, chosen minus rejected. "
        "It should grow steadily; a sudden blow-up usually means over-optimisation (try a larger beta).",
        [("rewards/margins", "train", BLUE, "-"), ("eval_rewards/margins", "eval", ORANGE, "-")],
        True,
    ),
    (
        "logps",
        "Log-probabilities",
        "sequence log-prob",
        "Policy (solid) and reference (dashed) log-probs of "
        "the chosen and rejected responses. Chosen should hold while rejected falls; both falling together is "
        "the suppression failure mode.",
        [
            ("logps/chosen", "policy chosen", GREEN, "-"),
            ("logps/rejected", "policy rejected", RED, "-"),
            ("logps/ref_chosen", "reference chosen", GREEN, "--"),
            ("logps/ref_rejected", "reference rejected", RED, "--"),
        ],
        True,
    ),
    (
        "rewards",
        "Implicit reward, chosen vs rejected",
        "reward",
        "Mean implicit reward of chosen and rejected "
        "per step (for DPO beta·(log π − log π_ref)). The gap between them is the margin; a good run pushes "
        "rejected down more than it pulls chosen down.",
        [("rewards/chosen", "chosen", GREEN, "-"), ("rewards/rejected", "rejected", RED, "-")],
        True,
    ),
    (
        "unpaired_rewards",
        "Implicit reward, desirable vs undesirable",
        "reward",
        "Mean implicit reward of "
        "desirable and undesirable examples per step (unpaired loss); they should separate, desirable above.",
        [
            ("rewards/desirable", "desirable", GREEN, "-"),
            ("rewards/undesirable", "undesirable", RED, "-"),
            ("eval_rewards/desirable", "eval desirable", GREEN, ":"),
            ("eval_rewards/undesirable", "eval undesirable", RED, ":"),
        ],
        True,
    ),
    (
        "kl",
        "KL estimate",
        "KL",
        "KL(policy ‖ reference): the unpaired loss's batch estimate (its reference point), or GRPO's "
        "token mean of k3 on the sampled completions; a steady rise means the policy is drifting from the reference.",
        [("kl", "KL", BLUE, "-")],
        True,
    ),
    (
        "grpo_reward",
        "Reward of the sampled completions",
        "reward",
        "GRPO: mean reward of the completions sampled from the policy at each step, and the mean "
        "std of the rewards within a group, which is what gives advantages. The reward should rise.",
        [("reward", "mean reward", BLUE, "-"), ("reward_std", "std within a group", GREY, "--")],
        True,
    ),
    (
        "grpo_zero_std",
        "Groups without signal",
        "fraction of groups",
        "GRPO: the fraction of groups whose completions all got the same reward: their advantages "
        "are 0 and they give no gradient. Near 1, the prompts are too hard (or too easy) for the policy.",
        [("frac_reward_zero_std", "all equal", GREY, "-")],
        True,
    ),
    (
        "grpo_lengths",
        "Completion length",
        "tokens",
        "GRPO: mean, shortest and longest sampled completion; a mean creeping up to the longest "
        "is the policy running into max_completion_length.",
        [
            ("completions/mean_length", "mean", BLUE, "-"),
            ("completions/min_length", "min", GREY, ":"),
            ("completions/max_length", "max", GREY, "--"),
        ],
        True,
    ),
    (
        "grpo_clip",
        "Clipped ratio",
        "fraction of tokens",
        "GRPO: tokens whose ratio to the sampling policy left the clip range (their gradient is cut); "
        "0 on-policy (num_iterations 1), a few percent when a sampled batch is reused.",
        [
            ("clip_ratio/region_mean", "either side", BLUE, "-"),
            ("clip_ratio/low_mean", "low", RED, ":"),
            ("clip_ratio/high_mean", "high", GREEN, ":"),
        ],
        True,
    ),
    (
        "learning_rate",
        "Learning rate",
        "learning rate",
        "The schedule actually applied: warm-up, then decay.",
        [("learning_rate", "learning rate", GREY, "-")],
        False,
    ),
    (
        "grad_norm",
        "Gradient norm",
        "norm",
        "Gradient norm before clipping. Spikes that keep coming back point to a too-high learning rate.",
        [("grad_norm", "grad norm", GREY, "-")],
        True,
    ),
    (
        "throughput",
        "Throughput",
        "tokens / s",
        "Training tokens processed per second; dips are evaluation, checkpointing or another job on the machine.",
        [("throughput/tokens_per_s", "tokens/s", GREY, "-")],
        True,
    ),
]
GUIDES = {"accuracy": 0.5, "margins": 0.0, "rewards": 0.0, "unpaired_rewards": 0.0}  # dotted y line: chance / 0
HIST_CAPTION = (
    "Distribution of the per-step <em>mean</em> implicit rewards of chosen and rejected responses "
    "(per-example rewards are not stored). The two should drift apart as training goes on."
)


def write_report(outdir, dest=None) -> Path:
    """Write DEST (default OUTDIR/report)/index.html, plots embedded; return its path."""
    outdir = Path(outdir)
    if not outdir.is_dir():
        raise PrefoptError(
            f"{outdir} is not a folder; expected the output folder of a training run (the one holding metrics.jsonl)."
        )
    rows = read_metrics(outdir / "metrics.jsonl")
    series = _series(rows["train"], rows["eval"])
    dest = Path(dest) if dest is not None else outdir / "report"
    _check_dest(dest)
    try:
        return _write_pages(outdir, dest, rows, series)
    except OSError as e:
        raise PrefoptError(
            f"{dest}: cannot write the report there ({e.strerror or e}); give another --out folder."
        ) from None


def _check_dest(dest: Path) -> None:
    """A PrefoptError unless `dest` is, or can be made, a folder whose index.html is not someone
    else's page (a report never overwrites a file it did not write)."""
    if dest.exists() and not dest.is_dir():
        raise PrefoptError(
            f"{dest}: is a file, not a folder; --out takes the folder to write index.html and its plots "
            "into: give a new or an existing folder."
        )
    index = dest / "index.html"
    if index.is_file():
        with open(index, "rb") as f:
            head = f.read(4096)
        if b"<title>prefopt report" not in head:
            raise PrefoptError(
                f"{index}: exists and is not a prefopt report; the report never overwrites it: give another "
                "--out folder."
            )
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrefoptError(
            f"{dest}: cannot create the report folder ({e.strerror or e}); give another --out folder."
        ) from None


def _write_pages(outdir: Path, dest: Path, rows: dict, series: dict) -> Path:
    """index.html of the report in `dest`, its plots embedded; the path of index.html."""
    figures = []
    for stem, title, ylabel, caption, lines, smooth in PLOTS:
        if any(key in series and not key.startswith("eval_") for key, *_ in lines):
            fig = _line_plot(title, ylabel, lines, series, smooth, GUIDES.get(stem))
            figures.append((stem, _data_uri(fig), title, html.escape(caption)))
        if stem == "rewards" and "rewards/chosen" in series and "rewards/rejected" in series:
            fig = _histogram(series["rewards/chosen"][1], series["rewards/rejected"][1])
            figures.append(("rewards_hist", _data_uri(fig), "Implicit reward distribution", HIST_CAPTION))
    index = dest / "index.html"
    grpo = any("frac_reward_zero_std" in r for r in rows["train"])  # a GRPO run logs it
    write_text_atomic(index, _html(outdir, _config_summary(outdir, grpo), _summary(rows), figures))
    return index


def _data_uri(fig) -> str:
    """`fig` as a PNG data URI (the page carries its images)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def read_metrics(path: Path) -> dict:
    """{"train"|"eval"|"summary": [record, ...] sorted by step}; the last line of a (step, kind) wins."""
    if not path.is_file():
        raise PrefoptError(
            f"{path} not found; expected the metrics.jsonl that a training run writes into its output folder."
        )
    latest = {}
    for n, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PrefoptError(
                f"{path} line {n}: not valid JSON ({e.msg}); expected one JSON object per line."
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), (int, float)):
            raise PrefoptError(f'{path} line {n}: expected a JSON object with a numeric "step".')
        latest[(record["step"], _kind(record))] = record
    if not latest:
        raise PrefoptError(f"{path} is empty; expected one JSON object per logged training step.")
    rows = {"train": [], "eval": [], "summary": []}
    for (_step, kind), record in sorted(latest.items(), key=lambda kv: kv[0][0]):
        rows[kind].append(record)
    return rows


def _lines(path: Path) -> list[str]:
    """The lines of the UTF-8 text file `path`; a file that cannot be read, or a line that is not
    UTF-8, a PrefoptError naming the file and the line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PrefoptError(f"{path}: cannot read it ({e.strerror or e}).") from None
    lines = []
    for n, raw in enumerate(data.splitlines(), 1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise PrefoptError(
                f"{path} line {n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                "expected the metrics.jsonl that prefopt train writes (one JSON object per line)."
            ) from None
    return lines


def _kind(record: dict) -> str:
    if any(k.startswith("train_") for k in record):
        return "summary"
    return "eval" if any(k.startswith("eval_") for k in record) else "train"


def _series(train: list, evals: list) -> dict:
    """metric key -> (steps, values), finite numbers only; eval keys keep their "eval_" prefix."""
    out = {}
    for record in train + evals:
        for key, v in record.items():
            if key != "step" and _is_number(v) and math.isfinite(v):
                steps, values = out.setdefault(key, ([], []))
                steps.append(record["step"])
                values.append(float(v))
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _ema(values: list) -> list:
    """Exponential moving average with a span of about a tenth of the points (5 to 50)."""
    alpha = 2 / (min(50, max(5, len(values) // 10)) + 1)
    out = [values[0]]
    for v in values[1:]:
        out.append(alpha * v + (1 - alpha) * out[-1])
    return out


def _new_axes(title: str, ylabel: str):
    fig = Figure(figsize=(6.4, 3.6), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11, loc="left")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 5))  # 4e-4, not 0.00040
    return fig, ax


def _line_plot(title, ylabel, lines, series, smooth, guide=None):
    """The figure of one line plot (PLOTS)."""
    fig, ax = _new_axes(title, ylabel)
    if guide is not None:
        ax.axhline(guide, color=GREY, lw=0.8, ls=":")
    for key, label, colour, style in lines:
        if key not in series:
            continue
        steps, values = series[key]
        if key.startswith("eval_"):
            ax.plot(steps, values, style, color=colour, marker="o", ms=4, lw=1.2, label=label)
        elif smooth and len(values) > SMOOTH_ABOVE:
            ax.plot(steps, values, style, color=colour, lw=0.8, alpha=0.3)
            ax.plot(steps, _ema(values), style, color=colour, lw=1.8, label=f"{label} (EMA)")
        else:
            ax.plot(
                steps,
                values,
                style,
                color=colour,
                lw=1.5,
                marker="." if len(values) <= SMOOTH_ABOVE else None,
                label=label,
            )
    ax.set_xlabel("step")
    labelled = [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
    if len(labelled) > 1 or "EMA" in labelled[0]:
        ax.legend(fontsize=8, frameon=False)
    return fig


def _histogram(chosen: list, rejected: list):
    """The figure of the per-step mean rewards' histogram, chosen beside rejected."""
    fig, ax = _new_axes("Per-step mean implicit reward", "number of steps")
    lo, hi = min(chosen + rejected), max(chosen + rejected)
    bins = [lo + (hi - lo) * i / 20 for i in range(21)] if hi > lo else 10
    ax.hist(chosen, bins=bins, color=GREEN, alpha=0.5, label="chosen")
    ax.hist(rejected, bins=bins, color=RED, alpha=0.5, label="rejected")
    ax.set_xlabel("mean implicit reward of the step")
    ax.legend(fontsize=8, frameon=False)
    return fig


def _config_summary(outdir: Path, grpo: bool = False) -> list:
    """[(label, value)] of the settings that matter from OUTDIR/prefopt.yaml; [] when absent."""
    path = outdir / "prefopt.yaml"
    if not path.is_file():
        return []
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return [("config", "prefopt.yaml could not be parsed")]
    if not isinstance(cfg, dict):
        return [("config", "prefopt.yaml is not a mapping")]
    model, lora, loss, train, data = (cfg.get(s) or {} for s in ("model", "lora", "loss", "train", "data"))
    g = cfg.get("grpo") or {}
    unit = "prompts " if grpo else ""
    objective = [
        ("method", "GRPO"),
        ("reward", g.get("reward")),
        ("prompts", g.get("prompts")),
        ("completions per prompt", g.get("num_generations")),
        ("beta", g.get("beta")),
        ("loss type", g.get("loss_type")),
    ]
    items = [
        ("model", model.get("name")),
        *(
            objective
            if grpo
            else [
                ("loss", loss.get("name")),
                ("beta", loss.get("beta") if loss.get("beta") is not None else "default"),
            ]
        ),
        ("LoRA", f"r={lora.get('r')}, alpha={lora.get('alpha')}" if lora.get("enabled") else "off"),
        ("learning rate", train.get("lr")),
        ("batch", f"{train.get('batch_size')} {unit}per device × {train.get('grad_accum', 1)} accumulation"),
        (
            "length",
            f"{train['max_steps']} steps" if (train.get("max_steps") or -1) > 0 else f"{train.get('epochs')} epochs",
        ),
        ("train data", None if grpo else data.get("train")),
    ]
    return [(k, v) for k, v in items if v is not None]


def _summary(rows: dict) -> list:
    """[(label, value)] for the summary table: the figures a colleague looks at first."""
    train, evals, final = rows["train"], rows["eval"], (rows["summary"] or [{}])[-1]
    losses = [r["loss"] for r in train if _is_number(r.get("loss"))]
    items = [
        ("steps", max(r["step"] for r in train) if train else None),
        ("first loss", losses[0] if losses else None),
        ("last loss", losses[-1] if losses else None),
        ("final sampled reward (GRPO)", _last(train, "reward")),
        ("final accuracy", _last(train, "rewards/accuracies")),
        ("final margin", _last(train, "rewards/margins")),
        ("final reward–length correlation", _last(train, "rewards/length_corr")),
        ("mean train loss", final.get("train_loss")),
        ("runtime", _duration(final["train_runtime"]) if _is_number(final.get("train_runtime")) else None),
        ("samples / s", final.get("train_samples_per_second")),
        ("eval points", len(evals) or None),
        ("final eval loss", _last(evals, "eval_loss")),
        ("final eval accuracy", _last(evals, "eval_rewards/accuracies")),
        ("final eval margin", _last(evals, "eval_rewards/margins")),
    ]
    return [(k, _fmt(v)) for k, v in items if v is not None]


def _last(records: list, key: str):
    return next((r[key] for r in reversed(records) if _is_number(r.get(key))), None)


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; background: #f6f7f9;
       margin: 0; padding: 2rem; }
main { max-width: 1400px; margin: auto; }
h1 { margin: 0 0 .2rem; font-size: 1.6rem; }
h2 { font-size: 1.15rem; margin: 2rem 0 .6rem; }
.path { font-family: ui-monospace, monospace; color: #555; word-break: break-all; }
.cards { display: flex; flex-wrap: wrap; gap: .5rem; margin-top: 1rem; }
.card { background: #fff; border: 1px solid #dde1e6; border-radius: 6px; padding: .3rem .7rem; }
.card b { color: #666; font-weight: 500; margin-right: .4rem; }
table { border-collapse: collapse; background: #fff; border: 1px solid #dde1e6; }
td { padding: .35rem 1rem; border-bottom: 1px solid #eef0f2; }
td:first-child { color: #555; } td:last-child { font-variant-numeric: tabular-nums; text-align: right; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 1.2rem; }
figure { margin: 0; background: #fff; border: 1px solid #dde1e6; border-radius: 6px; padding: .8rem; }
figure img { width: 100%; height: auto; display: block; }
figcaption { color: #444; font-size: .9rem; margin-top: .4rem; }
"""


def _html(outdir: Path, config: list, summary: list, figures: list) -> str:
    e = html.escape
    cards = "".join(f'<span class="card"><b>{e(k)}</b>{e(str(v))}</span>' for k, v in config)
    table = "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in summary)
    figs = "".join(
        f'<figure id="{e(stem)}"><img src="{src}" alt="{e(title)}">'
        f"<figcaption><b>{e(title)}.</b> {caption}</figcaption></figure>\n"
        for stem, src, title, caption in figures
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
        f"<title>prefopt report: {e(outdir.name)}</title>\n<style>{CSS}</style></head>\n<body><main>\n"
        f'<h1>Training report</h1>\n<div class="path">{e(str(outdir.resolve()))}</div>\n'
        + (f'<div class="cards">{cards}</div>\n' if cards else "")
        + f"<h2>Summary</h2>\n<table>{table}</table>\n"
        + (f'<h2>Plots</h2>\n<div class="grid">\n{figs}</div>\n' if figs else "<p>No plottable metrics.</p>")
        + "</main></body></html>\n"
    )
