"""`prefopt frontier CONFIG`: the reward–KL frontier of several losses on one task (the DPO
paper's Figure 2, left). Pairs are sampled from the reference once; for every (loss, β) of the
grid a fresh LoRA adapter trains on them and is evaluated on held-out prompts: mean reward of the
policy's samples against KL(π‖π_ref). Unpaired losses (KTO) train on the binarised pairs (chosen =
desirable, rejected = undesirable). Writes OUT/frontier.csv (one row per run, written as each
finishes) and OUT/frontier.png (one curve per loss, each point labelled with its β).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from matplotlib import colormaps
from matplotlib.figure import Figure

from prefopt.experiments.experiment import (
    EVAL_FIELDS,
    Experiment,
    ExperimentConfig,
    as_dict,
    elapsed,
    result_row,
    write_csv,
)

log = logging.getLogger("prefopt")

COLUMNS = ["loss", "beta", *EVAL_FIELDS, "steps", "first_loss", "last_loss", "seconds"]


def run_frontier(cfg: ExperimentConfig) -> dict:
    """Train and evaluate every (loss, β) of cfg.grid on one set of reference pairs; writes
    OUT/frontier.csv (a row as each run finishes) and OUT/frontier.png."""
    t0 = time.time()
    exp = Experiment(cfg)
    sampler = exp.fresh_policy()
    examples, counts = exp.pairs(sampler, from_reference=True, seed=cfg.seed + 1, desc="sampling pairs")
    del sampler
    log.info("frontier: %d pairs from %d prompts (%d ties dropped)", counts["pairs"], counts["prompts"], counts["ties"])
    csv_path = exp.out / "frontier.csv"
    rows = []
    runs = [(loss, float(beta)) for loss, betas in cfg.grid.items() for beta in betas]
    for n, (loss, beta) in enumerate(runs, 1):
        log.info("frontier: run %d/%d: %s, beta %g", n, len(runs), loss, beta)
        t = time.time()
        model = exp.fresh_policy()
        history = exp.train(model, examples, loss, beta, exp.out / f"{loss}-beta{beta:g}")
        rows.append(result_row(exp.evaluate(model), history, t, loss=loss, beta=beta))
        write_csv(csv_path, rows, COLUMNS)  # what finished so far survives a crash of a later run
        log.info(
            "frontier: %s beta %g: reward %.3f (gain %+.3f) at KL %.2f nats",
            loss,
            beta,
            rows[-1]["reward_policy"],
            rows[-1]["reward_gain"],
            rows[-1]["kl_nats"],
        )
    png = plot(rows, exp.out / "frontier.png", title=f"{cfg.reward} reward vs KL ({cfg.prompts} prompts)")
    return {
        "csv": str(csv_path),
        "png": str(png),
        "rows": rows,
        "pairs": counts,
        "seconds": elapsed(t0),
        "config": as_dict(cfg),
    }


def plot(rows: list[dict], path: Path, title: str = "reward vs KL") -> Path:
    """The frontier: one reward-vs-KL curve per loss, each point labelled with its β; saved to `path`."""
    fig = Figure(figsize=(7, 4.5), dpi=110)
    ax = fig.add_subplot()
    by_loss: dict[str, list] = {}
    for r in rows:
        by_loss.setdefault(r["loss"], []).append(r)
    if rows:  # every policy starts at the reference: KL 0, the reference's reward
        ax.axhline(rows[0]["reward_reference"], color="#888", linestyle=":", linewidth=1)
        ax.plot(
            [0],
            [rows[0]["reward_reference"]],
            marker="*",
            markersize=12,
            color="black",
            linestyle="none",
            label="reference",
        )
    if len(by_loss) > 10:  # more curves than the default cycle has colours
        ax.set_prop_cycle(color=[colormaps["tab20"](i) for i in range(20)])
    for loss, rs in by_loss.items():
        rs = sorted(rs, key=lambda r: r["kl_nats"])
        (line,) = ax.plot([r["kl_nats"] for r in rs], [r["reward_policy"] for r in rs], marker="o", label=loss)
        for r in rs:
            ax.annotate(
                f"β={r['beta']:g}",
                (r["kl_nats"], r["reward_policy"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color=line.get_color(),
            )
    ax.set_xlim(left=0)
    ax.set_xlabel("KL(π ‖ π_ref), nats per sequence")
    ax.set_ylabel("mean reward of policy samples")
    ax.set_title(title, loc="left", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    return path
