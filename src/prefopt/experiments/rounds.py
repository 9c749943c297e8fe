"""`prefopt rounds CONFIG`: on-policy iterations. Round 1 samples `samples` responses per
training prompt from the reference, scores them with the reward, builds pairs (best vs worst, or
RSO) and trains a LoRA adapter; every later round samples from the current policy instead and
trains the same adapter further (the reference stays the base model, so KL is measured from the
same point). After each round, reward and KL(π‖π_ref) on held-out prompts are logged.

For comparison (baseline: on) a fresh adapter trains offline on round 1's pairs for as many epochs
as there were rounds — the same number of steps, no new samples. Writes OUT/rounds.csv.
"""

from __future__ import annotations

import logging
import time

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

COLUMNS = ["run", "round", "pairs", *EVAL_FIELDS, "steps", "last_loss", "seconds"]


def run_rounds(cfg: ExperimentConfig, baseline: bool = True) -> dict:
    """The on-policy rounds of `cfg` (and the offline baseline); writes OUT/rounds.csv and returns
    the rows."""
    t0 = time.time()
    exp = Experiment(cfg)
    rows, first_pairs = _on_policy(exp, cfg)
    if baseline and cfg.rounds > 1:
        rows.append(_offline(exp, cfg, first_pairs))
    path = exp.out / "rounds.csv"
    write_csv(path, rows, COLUMNS)
    return {"csv": str(path), "rows": rows, "seconds": elapsed(t0), "config": as_dict(cfg)}


def _on_policy(exp: Experiment, cfg: ExperimentConfig) -> tuple[list[dict], list[dict]]:
    """(one row per round, round 1's pairs): sample, score, pair, train the same adapter, evaluate."""
    model = exp.fresh_policy()
    rows, first_pairs = [], None
    for r in range(1, cfg.rounds + 1):
        t = time.time()
        source = "reference" if r == 1 else "policy"
        examples, counts = exp.pairs(
            model, from_reference=r == 1, seed=cfg.seed + r, desc=f"round {r}: sampling {source}"
        )
        first_pairs = first_pairs or examples
        history = exp.train(model, examples, cfg.loss, cfg.beta, exp.out / f"round-{r}")
        ev = exp.evaluate(model)
        rows.append(result_row(ev, history, t, run="on-policy", round=r, pairs=counts["pairs"]))
        log.info(
            "round %d: %d pairs, reward %.3f (gain %+.3f ± %.2f) at KL %.2f nats",
            r,
            counts["pairs"],
            ev["reward_policy"],
            ev["reward_gain"],
            ev["reward_se"],
            ev["kl_nats"],
        )
    return rows, first_pairs


def _offline(exp: Experiment, cfg: ExperimentConfig, pairs: list[dict]) -> dict:
    """The baseline row: a fresh adapter trained on round 1's pairs for `rounds` times the epochs."""
    t = time.time()
    offline = exp.fresh_policy()
    epochs = cfg.epochs
    exp.cfg.epochs = epochs * cfg.rounds
    try:
        history = exp.train(offline, pairs, cfg.loss, cfg.beta, exp.out / "offline")
    finally:
        exp.cfg.epochs = epochs
    ev = exp.evaluate(offline)
    return result_row(ev, history, t, run=f"offline x{cfg.rounds} epochs", round=cfg.rounds, pairs=len(pairs))


def table(result: dict) -> str:
    """The rows as an aligned text table."""
    lines = [f"  {'run':<22}{'round':>6}{'pairs':>7}{'reward':>9}{'gain':>9}{'± s.e.':>8}{'win':>7}{'KL':>8}"]
    for r in result["rows"]:
        lines.append(
            f"  {r['run']:<22}{r['round']:>6}{r['pairs']:>7}{r['reward_policy']:>9.3f}"
            f"{r['reward_gain']:>+9.3f}{r['reward_se']:>8.2f}{r['win_rate']:>7.3f}{r['kl_nats']:>8.2f}"
        )
    return "\n".join(lines)
