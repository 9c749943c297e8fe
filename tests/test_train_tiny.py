"""prefopt.recipes.train.train in-process on the tiny model: settings that must not change the maths
(precomputed vs on-the-fly reference, gradient accumulation, activation checkpointing) give the
same per-step metrics; evaluation metrics are logged."""

from __future__ import annotations

import json

import pytest

from prefopt import config
from prefopt.recipes.train import train

PAIRS = [
    {
        "prompt": f"Question {i}: what is {i} plus {i}?",
        "chosen": f" {2 * i}.",
        "rejected": f" I do not know, maybe {i + 1} or so.",
    }
    for i in range(8)
]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-train") / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return path


def run(tiny_dir, pairs_file, tmp_path, name, **sections) -> list[dict]:
    raw = {
        "model": {"name": tiny_dir},
        "data": {"train": str(pairs_file), "max_length": 64, "max_prompt_length": 32},
        "reference": {"cache_dir": str(tmp_path / "ref-cache")},
        "train": {
            "output_dir": str(tmp_path / name),
            "max_steps": 3,
            "batch_size": 2,
            "lr": 1e-2,
            "warmup_ratio": 0.0,
            "progress": False,
            "seed": 0,
            "bf16": False,
        },  # equalities of maths are checked in float32 (bf16 rounding depends on shapes)
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    summary = train(config.from_dict(raw))
    assert summary["steps"] == raw["train"]["max_steps"]
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return rows


def train_rows(rows):
    return [r for r in rows if "loss" in r]


def same_metrics(a, b, keys=("loss", "grad_norm", "rewards/margins", "rewards/chosen", "logps/rejected")):
    a, b = train_rows(a), train_rows(b)
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), (k, ra, rb)
    # and the model did move: otherwise equal metrics would prove nothing
    assert abs(a[-1]["rewards/margins"]) > 1e-3


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_precomputed_reference_equals_on_the_fly(tiny_dir, pairs_file, tmp_path, lora):
    lora_cfg = {"enabled": lora, "r": 4}
    a = run(tiny_dir, pairs_file, tmp_path, "pre", lora=lora_cfg)
    b = run(tiny_dir, pairs_file, tmp_path, "fly", lora=lora_cfg, reference={"precompute": False})
    same_metrics(a, b, keys=("loss", "grad_norm", "rewards/margins", "logps/ref_chosen", "logps/ref_rejected"))
    assert train_rows(a)[0]["loss"] == pytest.approx(0.693147, abs=1e-5)


def test_grad_accum_equals_bigger_batch(tiny_dir, pairs_file, tmp_path):
    a = run(tiny_dir, pairs_file, tmp_path, "b2")
    b = run(tiny_dir, pairs_file, tmp_path, "b1x2", train={"batch_size": 1, "grad_accum": 2})
    same_metrics(a, b)


@pytest.mark.parametrize("mode", [True, "mlp"], ids=["layers", "mlp"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_activation_checkpointing_is_exact(tiny_dir, pairs_file, tmp_path, lora, mode):
    """Whole-layer checkpointing is the default; it, and MLP-only checkpointing, change nothing but
    memory and time."""
    assert config.TrainConfig().gradient_checkpointing is True
    lora_cfg = {"enabled": lora, "r": 4}
    a = run(tiny_dir, pairs_file, tmp_path, "plain", lora=lora_cfg, train={"gradient_checkpointing": False})
    b = run(tiny_dir, pairs_file, tmp_path, "ckpt", lora=lora_cfg, train={"gradient_checkpointing": mode})
    same_metrics(a, b)


@pytest.mark.parametrize(
    "setting,lora", [(None, True), (False, True), (None, False)], ids=["default-lora", "off-lora", "default-full"]
)
def test_memory_savers_engage(tiny_dir, pairs_file, tmp_path, monkeypatch, setting, lora):
    """The default really checkpoints the decoder layers while training (and `false` really does
    not); a full fine-tune of a tied-embedding model in one process takes sparse lookup gradients
    (LoRA, whose embedding is frozen, does not)."""
    from transformers import TrainerCallback

    import prefopt.recipes.train as pt
    from prefopt.modeling.logprobs import unwrap

    seen = []

    class Look(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            m = unwrap(model)
            on = getattr(m, "is_activation_checkpointing", None)  # newer name of is_gradient_checkpointing
            seen.append((m.is_gradient_checkpointing if on is None else on, m.get_input_embeddings().sparse))

    make = pt.make_trainer

    def make_trainer(*a, **k):
        trainer = make(*a, **k)
        trainer.add_callback(Look())
        return trainer

    monkeypatch.setattr(pt, "make_trainer", make_trainer)
    train_cfg = {} if setting is None else {"gradient_checkpointing": setting}
    run(tiny_dir, pairs_file, tmp_path, "look", lora={"enabled": lora, "r": 4}, train=train_cfg)
    assert seen == [(setting is None, not lora)] * 3


def test_eval_metrics(tiny_dir, pairs_file, tmp_path):
    rows = run(tiny_dir, pairs_file, tmp_path, "eval", data={"eval_fraction": 0.25}, train={"eval_steps": 1})
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals][:3] == [1, 2, 3]
    for r in evals:
        for k in ("eval_rewards/margins", "eval_rewards/accuracies", "eval_logps/chosen"):
            assert k in r
    # training metrics are not mixed into evaluation rows, nor the other way round
    assert all(not any(k.startswith("eval_") for k in r) for r in train_rows(rows))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_bf16_first_step_policy_equals_precomputed_reference(tiny_dir, pairs_file, tmp_path, lora):
    """With bf16 autocast the reference is precomputed under autocast while the Trainer autocasts
    only the model's own forward: the first step (before any update) must still see policy ==
    reference exactly — loss ln 2, zero margins — or every implicit reward is offset by noise."""
    import math

    # One batch holds all 8 pairs, in training as in the precompute: bf16 kernels round differently
    # for different batch shapes (padding width), which would add noise of its own (~1e-3 relative).
    rows = train_rows(
        run(
            tiny_dir,
            pairs_file,
            tmp_path,
            f"bf16-{lora}",
            lora={"enabled": lora, "r": 4},
            train={"bf16": True, "batch_size": 8},
        )
    )
    first = rows[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == 0 and first["logps/chosen"] == first["logps/ref_chosen"]
    assert abs(rows[-1]["rewards/margins"]) > 1e-3  # and it trains
