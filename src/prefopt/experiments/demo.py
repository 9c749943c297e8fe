"""`prefopt demo`: the DPO paper's controlled-sentiment experiment in miniature, fully offline.

1. the reference model (embedded SmolLM2-135M-Instruct) continues movie-review openings,
   K samples per prompt;
2. VADER scores each continuation; the most positive becomes chosen, the least positive
   rejected (prompts whose best and worst score tie are dropped and counted);
3. DPO with LoRA trains on those pairs (reference log-probs computed once, before training);
4. on held-out prompts, reference and policy both sample; the table shows mean reward before and
   after, the policy's win rate against the reference, and KL(π‖π_ref) estimated from the
   policy's samples.

`prefopt demo --task code` is the same loop as Code-DPO: the code task's train problems, answers
run against their unit tests in the sandbox (tests_binary), a passing answer chosen and a failing
one rejected, held-out pass@1 at temperature 1 before and after (docs/code.md).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from prefopt.errors import PrefoptError
from prefopt.experiments.experiment import Experiment, ExperimentConfig, as_dict

log = logging.getLogger("prefopt")

DEMO = dict(prompts="sentiment", reward="vader", loss="sigmoid", beta=0.1, lr=5e-4)  # the rest: the defaults
# Code-DPO (`--task code`): every train problem of the code task, 6 answers each from the reference;
# a passing answer is chosen, a failing one rejected (tests_binary: 1 only when all tests pass);
# pass@1 on every held-out problem, 4 answers each at temperature 1
CODE = dict(
    prompts="code",
    reward="tests_binary",
    train_prompts=129,
    eval_prompts=64,
    samples=6,
    eval_samples=4,
    max_new_tokens=128,
    loss="sigmoid",
    beta=0.1,
    lr=5e-4,
    epochs=2.0,
)
TASKS = {"sentiment": DEMO, "code": CODE}
NOT_SETTINGS = ("out", "progress", "grid", "loss_options", "rounds")  # where results go, or keys the demo does not use
QUICK = dict(train_prompts=16, eval_prompts=4, samples=2, eval_samples=2, max_new_tokens=8, batch_size=4)
QUICK_CODE = dict(QUICK, samples=4, max_new_tokens=96)  # an answer needs room to pass its tests


def demo_config(
    out: str = "runs/demo", seed: int = 0, quick: bool = False, task: str = "sentiment"
) -> ExperimentConfig:
    """The demo's experiment: the built-in sentiment task, DPO at β 0.1 with lr 5e-4; or (`task`
    "code") Code-DPO on the code task. `quick`: a tiny run that checks the machinery, not a result."""
    if task not in TASKS:
        raise PrefoptError(f"demo: --task must be one of {', '.join(TASKS)}, found {task!r}.")
    return ExperimentConfig(
        **{**TASKS[task], **((QUICK_CODE if task == "code" else QUICK) if quick else {}), "out": out, "seed": seed}
    )


def run_demo(out: str = "runs/demo", seed: int = 0, quick: bool = False, task: str = "sentiment") -> dict:
    """Run the demo of `task`, print its table, write demo_results.json and demo_pairs.jsonl (and
    the adapter with its prefopt.yaml) into `out`; returns the results."""
    cfg = demo_config(out, seed, quick, task)
    t0 = time.time()
    times = {}
    exp = Experiment(cfg)
    model = exp.fresh_policy()
    times["load"] = time.time() - t0

    t = time.time()  # 1-2. sample from the reference, score, build best-vs-worst pairs
    examples, counts = exp.pairs(model, from_reference=True, seed=seed + 1, desc="1/4 sampling pairs")
    times["sample+score"] = time.time() - t
    log.info(
        "%d pairs from %d prompts; %d prompts dropped (best and worst scores tie)",
        len(examples),
        counts["prompts"],
        counts["ties"],
    )

    t = time.time()  # 3. DPO with LoRA
    train_log = exp.train(model, examples, cfg.loss, cfg.beta, exp.out, save=True)
    times["train"] = time.time() - t

    t = time.time()  # 4. evaluate on held-out prompts
    ev = exp.evaluate(model)
    times["eval"] = time.time() - t
    times["total"] = time.time() - t0

    result = {
        "pairs": len(examples),
        "ties_dropped": counts["ties"],
        "eval_samples": ev["samples"],
        "reward_reference": round(ev["reward_reference"], 3),
        "reward_policy": round(ev["reward_policy"], 3),
        "reward_gain": round(ev["reward_gain"], 3),
        "reward_se": round(ev["reward_se"], 3),
        "win_rate": round(ev["win_rate"], 3),
        "kl_nats": round(ev["kl_nats"], 2),
        "task": task,
        "first_loss": round(train_log[0]["loss"], 4),
        "last_loss": round(train_log[-1]["loss"], 4),
        "steps": train_log[-1]["step"],
        "settings": {k: v for k, v in as_dict(cfg).items() if k not in NOT_SETTINGS},
        "seconds": {k: round(v, 1) for k, v in times.items()},
    }
    _write(exp, examples, ev, result)
    print(table(result))
    return result


def _write(exp: Experiment, examples: list[dict], ev: dict, result: dict) -> None:
    """demo_pairs.jsonl (the training pairs as text) and demo_results.json (with 5 samples)."""

    def decode(ids):
        return exp.tokenizer.decode(ids, skip_special_tokens=True)

    samples = [
        {"prompt": p, "reference": decode(r[0]), "policy": decode(q[0])}
        for p, r, q in zip(exp.eval_text[:5], ev["ref_samples"][:5], ev["policy_samples"][:5])
    ]
    with open(exp.out / "demo_pairs.jsonl", "w") as f:
        for ex in examples:
            f.write(
                json.dumps(
                    {
                        "prompt": exp.tokenizer.decode(ex["prompt_ids"]),
                        "chosen": exp.tokenizer.decode(ex["chosen_ids"]),
                        "rejected": exp.tokenizer.decode(ex["rejected_ids"]),
                        "chosen_reward": ex["chosen_reward"],
                        "rejected_reward": ex["rejected_reward"],
                    }
                )
                + "\n"
            )
    (Path(exp.out) / "demo_results.json").write_text(json.dumps({**result, "samples": samples}, indent=2))


TITLES = {
    "sentiment": (
        "prefopt demo: DPO on controlled sentiment (SmolLM2-135M-Instruct, LoRA, VADER reward)",
        "mean sentiment reward",
        "prompts dropped for ties",
    ),
    "code": (
        "prefopt demo --task code: Code-DPO on the code task (SmolLM2-135M-Instruct, LoRA, unit tests in the sandbox)",
        "pass@1, temperature 1",
        "problems dropped: all answers pass or all fail",
    ),
}


def table(r: dict) -> str:
    """The demo's printed table."""
    title, measure, ties = TITLES[r.get("task", "sentiment")]
    lines = [
        "",
        title,
        f"  {r['pairs']} training pairs ({r['ties_dropped']} {ties}), "
        f"{r['steps']} steps, loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}",
        "",
        f"  {'held-out, ' + str(r['eval_samples']) + ' samples':<30}{'reference':>12}{'DPO policy':>12}",
        f"  {measure:<30}{r['reward_reference']:>12.3f}{r['reward_policy']:>12.3f}",
        f"  {'gain (± s.e.)':<30}{'':>12}{r['reward_gain']:>+8.3f} ±{r['reward_se']:.2f}",
        f"  {'win rate vs reference':<30}{'':>12}{r['win_rate']:>12.3f}",
        f"  {'KL(policy || reference), nats':<30}{0.0:>12.2f}{r['kl_nats']:>12.2f}",
        "",
        "  time: " + ", ".join(f"{k} {v:.0f}s" for k, v in r["seconds"].items()),
    ]
    return "\n".join(lines)
