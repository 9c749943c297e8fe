"""One definition of the implicit reward: what the training log reports as rewards/chosen,
rewards/rejected and rewards/margins is what `prefopt score` (and so `prefopt eval --data`) computes
for the same pairs from the same weights — for the losses whose reward is per token (SimPO,
sigmoid_norm, IPO with ipo_normalize), where a summed reward in one place and a per-token one in
the other would disagree by the response length.

Two comparisons per loss, each between numbers computed from the same weights:

    eval log (trainer.evaluate() after training, data.eval = the scored file)  vs  the final model
    train log of step 3 (forward before the 3rd optimizer step)                vs  OUT/checkpoint-2
"""

from __future__ import annotations

import json

import pytest

from prefopt import config
from prefopt.evaluation.reward_model import score_data
from prefopt.recipes.train import train

# responses of different lengths, so that summed and per-token rewards differ by more than a factor
PAIRS = [
    {"prompt": "Question 1: what is 1 plus 1?", "chosen": " 2.", "rejected": " I do not know, maybe 3 or so."},
    {"prompt": "Question 2: what is 2 plus 2?", "chosen": " It is 4.", "rejected": " 5, I think."},
    {"prompt": "Say hello.", "chosen": " Hello there, nice to meet you!", "rejected": " No."},
    {"prompt": "Name a colour.", "chosen": " Blue.", "rejected": " A colour is a property of light, for example."},
]
STEPS = 3
# the log rounds to 6 decimals (abs ≤ 5e-7); the rest is float32 noise from different batch layouts
REL, ABS = 1e-5, 2e-6
KEYS = ("chosen", "rejected", "margins")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("one-reward") / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return str(path)


def train_run(tiny_dir, pairs_file, folder, loss: dict):
    out = folder / loss["name"]
    raw = {
        "model": {"name": tiny_dir},
        "data": {"train": pairs_file, "eval": pairs_file, "max_length": 64, "max_prompt_length": 32},
        "loss": loss,
        "reference": {"cache_dir": str(folder / "ref-cache")},  # precompute: the default
        "train": {
            "output_dir": str(out),
            "max_steps": STEPS,
            "batch_size": len(PAIRS),  # every step (and the evaluation) sees the one same batch
            "lr": 1e-2,
            "warmup_ratio": 0.0,
            "logging_steps": 1,
            "save_steps": 2,  # OUT/checkpoint-2: the weights step 3's forward (and its log) used
            "save_total_limit": 0,
            "seed": 0,
            "bf16": False,
            "gradient_checkpointing": False,
            "progress": False,
        },
    }
    cfg = config.from_dict(raw)
    summary = train(cfg)
    assert summary["steps"] == STEPS and summary["eval_pairs"] == len(PAIRS)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, cfg, rows


def scored_means(model_dir, pairs_file, dest) -> tuple[dict, list[dict]]:
    """Mean chosen / rejected reward and mean margin over the pairs, from `prefopt score`'s lines."""
    res = score_data(str(model_dir), pairs_file, str(dest), batch_size=len(PAIRS), progress=False)
    lines = [json.loads(line) for line in open(res["out"], encoding="utf-8")]
    chosen = [r for r in lines if r["role"] == "chosen"]
    rejected = [r for r in lines if r["role"] == "rejected"]
    assert [r["record"] for r in chosen] == [r["record"] for r in rejected] == list(range(len(PAIRS)))
    c = [r["reward"] for r in chosen]
    r_ = [r["reward"] for r in rejected]
    n = len(PAIRS)
    means = {"chosen": sum(c) / n, "rejected": sum(r_) / n, "margins": sum(a - b for a, b in zip(c, r_)) / n}
    # the rest of prefopt eval agrees with its own lines
    assert res["policy"]["reward_chosen"]["mean"] == pytest.approx(means["chosen"], rel=1e-12, abs=1e-12)
    assert res["policy"]["margin_mean"] == pytest.approx(means["margins"], rel=1e-9, abs=1e-12)
    return means, lines


def summed_means(lines, beta: float, reference: bool) -> dict:
    """The same means under the summed reward β·(log π − log π_ref) (β·log π reference-free): what a
    log or score that forgot the per-token form would say."""

    def r(row):
        return beta * (row["logp"] - (row["ref_logp"] if reference else 0.0))

    c = [r(x) for x in lines if x["role"] == "chosen"]
    j = [r(x) for x in lines if x["role"] == "rejected"]
    n = len(c)
    return {"chosen": sum(c) / n, "rejected": sum(j) / n, "margins": (sum(c) - sum(j)) / n}


def close(a: float, b: float) -> bool:
    return abs(a - b) <= ABS + REL * abs(b)


LOSSES = [
    {"name": "simpo"},  # β = 2, reference-free: r = β/|y|·log π
    {"name": "sigmoid_norm"},  # β = 5: r = β/|y|·(log π − log π_ref)
    {"name": "ipo", "beta": 1.0, "ipo_normalize": True},  # β = 1 so the rewards are well above the log's rounding
]


@pytest.mark.parametrize("loss", LOSSES, ids=[x["name"] for x in LOSSES])
def test_logged_rewards_equal_scored_rewards(tiny_dir, pairs_file, tmp_path, loss):
    out, cfg, rows = train_run(tiny_dir, pairs_file, tmp_path, loss)
    beta = cfg.loss.beta
    reference = loss["name"] != "simpo"
    train_rows = [r for r in rows if "loss" in r and "rewards/chosen" in r]
    eval_rows = [r for r in rows if "eval_rewards/chosen" in r]
    assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))
    assert len(eval_rows) == 1 and eval_rows[0]["step"] == STEPS

    # 1. the evaluation pass after training (final weights) vs prefopt score of the saved model
    final, final_lines = scored_means(out, pairs_file, tmp_path / "final.jsonl")
    # 2. the train log of the last step vs prefopt score of the weights that step's forward saw
    ckpt, ckpt_lines = scored_means(out / "checkpoint-2", pairs_file, tmp_path / "ckpt2.jsonl")
    pairs = [
        ({k: eval_rows[0][f"eval_rewards/{k}"] for k in KEYS}, final, final_lines, "eval log vs final model"),
        ({k: train_rows[-1][f"rewards/{k}"] for k in KEYS}, ckpt, ckpt_lines, "step-3 log vs checkpoint-2"),
    ]
    diffs = {}
    for logged, scored, lines, what in pairs:
        for k in KEYS:
            diffs[(what, k)] = abs(logged[k] - scored[k])
            assert close(logged[k], scored[k]), (what, k, logged[k], scored[k])
        # the comparison discriminates: the summed reward is far from what was logged
        summed = summed_means(lines, beta, reference)
        for k in ("chosen", "margins"):
            assert abs(summed[k] - logged[k]) > 1e3 * (ABS + REL * abs(logged[k])), (what, k, summed[k], logged[k])
        # and each scored reward is per token: β/|y|·(log π − log π_ref)
        for row in lines:
            assert row["tokens"] >= 2
            x = row["logp"] - (row["ref_logp"] if reference else 0.0)
            assert row["reward"] == pytest.approx(beta * x / row["tokens"], rel=1e-9, abs=1e-12)
            if not reference:  # SimPO: |β/|y|·log π| is at most half of |β·log π|
                assert abs(row["reward"]) <= 0.5 * beta * abs(row["logp"])
    print(loss["name"], {f"{w}/{k}": f"{d:.2e}" for (w, k), d in diffs.items()})

    # the policy moved, so matching numbers are not the untrained model's
    first = train_rows[0]["rewards/margins"]
    assert abs(final["margins"] - first) > 1e-2 and abs(final["margins"] - ckpt["margins"]) > 1e-3
    if reference:  # before the first step the policy is the reference: every reward is 0
        assert train_rows[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
