"""`prefopt rounds CONFIG`: on-policy iterations. Round 1 samples `samples` responses per
training prompt from the reference, scores them with the reward, builds pairs (best vs worst, or
RSO) and trains a LoRA adapter; every later round samples from the current policy instead and
trains the same adapter further (the reference stays the base model, so KL is measured from the
same point). After each round, reward and KL(π‖π_ref) on held-out prompts are logged.

For comparison (baseline: on) a fresh adapter trains offline on round 1's pairs for as many epochs
as there were rounds — the same number of steps, no new samples. Writes OUT/rounds.csv.
"""

from __future__ import annotations

import csv
import logging
import time

from .experiment import Experiment, ExperimentConfig, as_dict, elapsed, summary_row

log = logging.getLogger("prefopt")

COLUMNS = ["run", "round", "pairs", "reward_policy", "reward_reference", "reward_gain", "reward_se", "win_rate",
           "kl_nats", "steps", "last_loss", "seconds"]


def run_rounds(cfg: ExperimentConfig, baseline: bool = True) -> dict:
    t0 = time.time()
    exp = Experiment(cfg)
    model = exp.fresh_policy()
    rows, first_pairs = [], None
    for r in range(1, cfg.rounds + 1):
        t = time.time()
        examples, counts = exp.pairs(model, from_reference=r == 1, seed=cfg.seed + r,
                                     desc=f"round {r}: sampling {'reference' if r == 1 else 'policy'}")
        first_pairs = first_pairs or examples
        history = exp.train(model, examples, cfg.loss, cfg.beta, exp.out / f"round-{r}")
        ev = exp.evaluate(model)
        rows.append(summary_row(run="on-policy", round=r, pairs=counts["pairs"], reward_policy=ev["reward_policy"],
                                reward_reference=ev["reward_reference"], reward_gain=ev["reward_gain"],
                                reward_se=ev["reward_se"], win_rate=ev["win_rate"], kl_nats=ev["kl_nats"],
                                steps=len(history), last_loss=history[-1]["loss"], seconds=elapsed(t)))
        log.info("round %d: %d pairs, reward %.3f (gain %+.3f ± %.2f) at KL %.2f nats", r, counts["pairs"],
                 ev["reward_policy"], ev["reward_gain"], ev["reward_se"], ev["kl_nats"])
    if baseline and cfg.rounds > 1:
        t = time.time()
        offline = exp.fresh_policy()
        epochs = cfg.epochs
        exp.cfg.epochs = epochs * cfg.rounds
        try:
            history = exp.train(offline, first_pairs, cfg.loss, cfg.beta, exp.out / "offline")
        finally:
            exp.cfg.epochs = epochs
        ev = exp.evaluate(offline)
        rows.append(summary_row(run=f"offline x{cfg.rounds} epochs", round=cfg.rounds, pairs=len(first_pairs),
                                reward_policy=ev["reward_policy"], reward_reference=ev["reward_reference"],
                                reward_gain=ev["reward_gain"], reward_se=ev["reward_se"], win_rate=ev["win_rate"],
                                kl_nats=ev["kl_nats"], steps=len(history), last_loss=history[-1]["loss"],
                                seconds=elapsed(t)))
    path = exp.out / "rounds.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return {"csv": str(path), "rows": rows, "seconds": elapsed(t0), "config": as_dict(cfg)}


def table(result: dict) -> str:
    lines = [f"  {'run':<22}{'round':>6}{'pairs':>7}{'reward':>9}{'gain':>9}{'± s.e.':>8}{'win':>7}{'KL':>8}"]
    for r in result["rows"]:
        lines.append(f"  {r['run']:<22}{r['round']:>6}{r['pairs']:>7}{r['reward_policy']:>9.3f}"
                     f"{r['reward_gain']:>+9.3f}{r['reward_se']:>8.2f}{r['win_rate']:>7.3f}{r['kl_nats']:>8.2f}")
    return "\n".join(lines)
