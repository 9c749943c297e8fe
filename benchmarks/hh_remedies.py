"""Suppression imbalance on real data, and its remedies: DPO against DPOP and Cal-DPO on the shared
HH-harmless pairs.

Recipe (issue 16): one epoch, LoRA r16 α32, lr 5e-4, β 0.1, batch 4 × accumulation 2, max_length
256, prompt 192, on the embedded model. The 1,424 shared pairs are split by position: every 5th pair
is held out (284 pairs), the other 1,140 are trained on (143 steps). Each run is evaluated on the
held-out pairs with `prefopt eval --json`: implicit-reward accuracy (± its standard error) and the
change of the mean summed log-prob of the chosen and rejected responses against the reference.

Usage: python benchmarks/hh_remedies.py [--losses sigmoid,dpop,cal_dpo] [--out runs/hh-remedies]
Runs already finished in OUT are read back, not retrained. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(os.environ.get("PREFOPT_SHARED_DATA", "../shared/data")) / "hh-harmless-train.jsonl"
RECIPE = [
    "--model.name", "default",
    "--lora.enabled", "true", "--lora.r", "16", "--lora.alpha", "32",
    "--data.eval_fraction", "0", "--data.max_length", "256", "--data.max_prompt_length", "192",
    "--loss.beta", "0.1",
    "--train.epochs", "1", "--train.batch_size", "4", "--train.grad_accum", "2", "--train.lr", "5e-4",
    "--train.warmup_ratio", "0.05", "--train.logging_steps", "10", "--train.progress", "false",
    "--train.seed", "0",
]  # fmt: skip


def split(out: Path) -> tuple[Path, Path]:
    """train.jsonl (4 of every 5 pairs) and heldout.jsonl (every 5th) in `out`."""
    lines = [line for line in DATA.read_text().splitlines() if line.strip()]
    train, held = out / "train.jsonl", out / "heldout.jsonl"
    for path, keep in ((train, lambda i: i % 5 != 4), (held, lambda i: i % 5 == 4)):
        text = "".join(line + "\n" for i, line in enumerate(lines) if keep(i))
        if not path.exists() or path.read_text() != text:  # a concurrent run may be reading it
            path.write_text(text)
    return train, held


def run(loss: str, out: Path, train: Path, held: Path) -> dict:
    """Train `loss` (unless OUT/LOSS/model exists) and evaluate it on the held-out pairs."""
    folder = out / loss
    result = out / f"{loss}.json"
    if result.exists():
        return json.loads(result.read_text())
    t0 = time.time()
    subprocess.run(
        [
            "prefopt",
            "train",
            *RECIPE,
            "--loss.name",
            loss,
            "--data.train",
            str(train),
            "--train.output_dir",
            str(folder),
        ],
        check=True,
    )
    seconds = time.time() - t0
    ev = subprocess.run(
        ["prefopt", "eval", "--model", str(folder), "--data", str(held), "--json"],
        check=True,
        capture_output=True,
        text=True,
    )
    figures = {"loss": loss, "train_seconds": round(seconds, 1), **json.loads(ev.stdout)}
    result.write_text(json.dumps(figures, indent=1))
    return figures


def row(f: dict) -> str:
    pol, ref = f["policy"], f["reference"]
    n = f["pairs"]
    acc = pol["reward_accuracy"]
    se = math.sqrt(acc * (1 - acc) / n)
    d_c = pol["logp_chosen_mean"] - ref["logp_chosen_mean"]
    d_r = pol["logp_rejected_mean"] - ref["logp_rejected_mean"]
    return (
        f"| {f['loss']} | {n} | {acc:.3f} ± {se:.3f} | {ref['likelihood_accuracy']:.3f} | "
        f"{d_c:+.2f} | {d_r:+.2f} | {f['train_seconds']:.0f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--losses", default="sigmoid,dpop,cal_dpo")
    ap.add_argument("--out", default="runs/hh-remedies")
    a = ap.parse_args()
    if not DATA.exists():
        sys.exit(f"{DATA} not found (set PREFOPT_SHARED_DATA)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    train, held = split(out)
    results = [run(loss, out, train, held) for loss in a.losses.split(",")]
    print(
        "| loss | held-out pairs | implicit-reward accuracy ± s.e. | reference likelihood accuracy "
        "| Δ log π(chosen) | Δ log π(rejected) | train s |"
    )
    print("|---|---|---|---|---|---|---|")
    for f in results:
        print(row(f))


if __name__ == "__main__":
    main()
