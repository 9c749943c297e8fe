"""Code task, issue 14 item 6: held-out pass@1 (± s.e.) and KL(π‖π_ref) of
(a) the reference, (b) Code-DPO on pairs from reference samples (`prefopt demo --task code`),
(c) two rounds of on-policy Code-DPO, (d) GRPO — each from the same number of sampled completions
(129 train problems × 6 answers = 774) — and GRPO on the sentiment task beside the DPO frontier.

    python benchmarks/code_methods.py --arms dpo,rounds,grpo,sentiment [--out runs/code-methods]

Every arm evaluates on the same 64 held-out problems × 4 answers at temperature 1 against the same
reference samples (seeded), so (a) is the same in each row. Writes OUT/<arm>.json; prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from prefopt.experiments.demo import demo_config, run_demo
from prefopt.experiments.experiment import EVAL_FIELDS, Experiment, ExperimentConfig
from prefopt.experiments.rounds import run_rounds


def figures(ev: dict) -> dict:
    return {k: round(ev[k], 4) for k in EVAL_FIELDS}


def dpo(out: Path) -> dict:
    """(a) and (b): the code demo itself."""
    r = run_demo(out=str(out / "dpo"), task="code")
    return {"arm": "Code-DPO, reference samples", "completions": 129 * 6, **r}


def rounds(out: Path) -> dict:
    """(c): two rounds of 3 answers per problem (774 completions in all), the same adapter trained
    on each round's pairs, 2 epochs a round."""
    cfg = demo_config(str(out / "rounds"), task="code")
    cfg.samples, cfg.rounds = 3, 2
    r = run_rounds(cfg, baseline=False)
    return {
        "arm": "Code-DPO, 2 on-policy rounds",
        "completions": 129 * 3 * 2,
        "rows": r["rows"],
        "seconds": r["seconds"],
    }


def grpo(out: Path) -> dict:
    """(d): GRPO, G = 6 answers per problem sampled from the current policy, 8 problems a step,
    one epoch over the 129 train problems (774 completions), reward = fraction of tests passed."""
    cfg = demo_config(str(out / "grpo"), task="code")
    t = time.time()
    exp = Experiment(cfg)
    model = exp.fresh_policy()
    history = exp.train_grpo(model, exp.out, reward="tests")
    trained = time.time() - t
    ev = exp.evaluate(model)
    return {
        "arm": "GRPO (reward: tests)",
        "completions": 129 * 6,
        **figures(ev),
        "steps": len(history),
        "history": history,
        "seconds": {"train": round(trained, 1), "total": round(time.time() - t, 1)},
    }


def sentiment(out: Path) -> dict:
    """GRPO on the frontier's sentiment task (its defaults: 200 prompts, 8 samples each, 32 tokens,
    lr 4e-4, batches of 8 prompts): reward and KL beside docs/frontier.csv."""
    cfg = ExperimentConfig(out=str(out / "sentiment"))
    t = time.time()
    exp = Experiment(cfg)
    model = exp.fresh_policy()
    history = exp.train_grpo(model, exp.out)
    ev = exp.evaluate(model)
    return {
        "arm": "GRPO on sentiment (vader)",
        **figures(ev),
        "steps": len(history),
        "history": history,
        "seconds": round(time.time() - t, 1),
    }


ARMS = {"dpo": dpo, "rounds": rounds, "grpo": grpo, "sentiment": sentiment}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", default="dpo,rounds,grpo,sentiment")
    p.add_argument("--out", default="runs/code-methods")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for arm in a.arms.split(","):
        result = ARMS[arm](out)
        (out / f"{arm}.json").write_text(json.dumps(result, indent=2, default=str))
        print(json.dumps({k: v for k, v in result.items() if k not in ("history", "settings")}, default=str))


if __name__ == "__main__":
    main()
