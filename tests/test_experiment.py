"""Reward-driven experiments on the tiny model: generation eval (KL is 0 for a policy equal to its
reference and positive once it moves), pairs from scored samples (best vs worst, RSO), the
reward–KL frontier and on-policy rounds end to end."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from prefopt.evaluation import rewards
from prefopt.evaluation.generation import generation_eval
from prefopt.experiments.experiment import Experiment, ExperimentConfig, binarise, build_pairs


def quick(tiny_dir, tmp_path, **kw):
    return ExperimentConfig.quick(
        **{
            "model": tiny_dir,
            "reward": "length",
            "out": str(tmp_path / "exp"),
            "progress": False,
            "max_new_tokens": 6,
            **kw,
        }
    )


def test_generation_eval_kl_is_zero_for_the_reference_and_positive_after_a_move(tiny_dir, tmp_path):
    exp = Experiment(quick(tiny_dir, tmp_path))
    model = exp.fresh_policy()  # a fresh LoRA adapter is zero: the policy is the reference
    with torch.no_grad():  # the random tiny model is near uniform; peaked logits make moves visible
        model.get_input_embeddings().weight.mul_(40.0)  # tied: the lm-head too, policy and reference alike
    res = generation_eval(
        model,
        exp.tokenizer,
        exp.eval_ids,
        exp.eval_text,
        exp.reward,
        samples=3,
        max_new_tokens=6,
        seed=5,
        progress=False,
    )
    assert res["policy_samples"] == res["ref_samples"]
    assert abs(res["kl_nats"]) < 1e-4 and res["reward_gain"] == 0 and res["win_rate"] == 0.5
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.5)
    moved = generation_eval(
        model,
        exp.tokenizer,
        exp.eval_ids,
        exp.eval_text,
        exp.reward,
        samples=3,
        max_new_tokens=6,
        seed=5,
        ref_samples=res["ref_samples"],
        progress=False,
    )
    assert moved["kl_nats"] > 0.01
    assert moved["reward_reference"] == res["reward_reference"]  # the reference samples were reused


def test_build_pairs_best_vs_worst_and_rso(smol_tokenizer):
    tok = smol_tokenizer
    enc = lambda t: tok(t, add_special_tokens=False).input_ids  # noqa: E731
    prompts = [enc("Review:"), enc("Film:")]
    samples = [[enc(" a"), enc(" a b c"), enc(" a b")], [enc(" x y"), enc(" z w")]]  # second prompt: a tie
    length = rewards.get("length")
    pairs, counts = build_pairs(prompts, ["Review:", "Film:"], samples, tok, length, "best_vs_worst", 1.0, 0)
    assert counts == {"prompts": 2, "ties": 1, "too_few_accepted": 0, "pairs": 1}
    assert pairs[0]["chosen_ids"] == enc(" a b c") and pairs[0]["rejected_ids"] == enc(" a")
    # RSO: acceptance exp((r - max r)/β); a tiny β keeps only the best sample of the first prompt (no
    # pair possible) and both tied samples of the second (accepted, then dropped as a tie)
    _, counts = build_pairs(prompts, ["Review:", "Film:"], samples, tok, length, "rso", 1e-6, 0)
    assert counts == {"prompts": 2, "ties": 1, "too_few_accepted": 1, "pairs": 0}
    pairs, counts = build_pairs(prompts, ["Review:", "Film:"], samples, tok, length, "rso", 1e6, 0)
    assert counts["pairs"] == 1  # a huge β accepts everything: best vs worst again
    unpaired = binarise(pairs)
    assert [u["label"] for u in unpaired] == [True, False]


def test_frontier_and_rounds_end_to_end(tiny_dir, tmp_path):
    from prefopt.experiments.frontier import run_frontier
    from prefopt.experiments.rounds import run_rounds

    cfg = quick(tiny_dir, tmp_path, grid={"sigmoid": [0.1, 0.5], "kto": [0.1]}, lr=5e-2)
    res = run_frontier(cfg)
    with open(res["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [(r["loss"], float(r["beta"])) for r in rows] == [("sigmoid", 0.1), ("sigmoid", 0.5), ("kto", 0.1)]
    assert all(math.isfinite(float(r["kl_nats"])) for r in rows)
    assert any(float(r["kl_nats"]) > 0.01 for r in rows)  # lr 5e-2: the policies moved
    png = open(res["png"], "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    rounds = run_rounds(quick(tiny_dir, tmp_path, rounds=2, lr=5e-2, out=str(tmp_path / "rounds")))
    runs = [(r["run"], r["round"]) for r in rounds["rows"]]
    assert runs == [("on-policy", 1), ("on-policy", 2), ("offline x2 epochs", 2)]
    assert (
        rounds["rows"][2]["steps"] == rounds["rows"][0]["steps"] + rounds["rows"][1]["steps"]
        or rounds["rows"][2]["steps"] == 2 * rounds["rows"][0]["steps"]
    )


def test_experiment_config_errors(tmp_path):
    from prefopt.errors import PrefoptError
    from prefopt.experiments.experiment import load_config

    with pytest.raises(PrefoptError, match="unknown key 'betas'"):
        load_config(None, {"betas": [0.1]})
    with pytest.raises(PrefoptError, match="grid.dpox"):
        load_config(None, {"grid": {"dpox": [0.1]}})
    with pytest.raises(PrefoptError, match="samples"):
        load_config(None, {"samples": 1})
    with pytest.raises(PrefoptError, match="reward 'sentimental'"):
        load_config(None, {"reward": "sentimental"})


def test_cli_rounds_and_frontier_quick(tiny_dir, tmp_path, capsys):
    from prefopt.cli import main

    out = tmp_path / "cli"
    assert (
        main(["rounds", "--quick", "--model", tiny_dir, "--reward", "length", "--out", str(out), "--rounds", "2"]) == 0
    )
    text = capsys.readouterr().out
    assert "on-policy" in text and "offline x2 epochs" in text and (out / "rounds.csv").is_file()
    assert main(["frontier", "--quick", "--model", tiny_dir, "--reward", "length", "--out", str(out)]) == 0
    assert (out / "frontier.png").is_file() and (out / "frontier.json").is_file()
    capsys.readouterr()
    # a reward that scores every sample the same gives no pairs: a clear error, not a crash
    assert main(["frontier", "--quick", "--model", tiny_dir, "--reward", "regex:^NEVER$", "--out", str(out)]) == 2
    assert "does not tell the samples apart" in capsys.readouterr().err
    assert main(["frontier", "--model", tiny_dir, "--grid", "{dpo: [0]}"]) == 2
    assert "grid.dpo" in capsys.readouterr().err


def test_code_dpo_pairs_a_passing_answer_with_a_failing_one(smol_tokenizer):
    """Code-DPO's pairs (reward tests_binary): a problem with a passing and a failing answer gives
    (passing, failing); one where every answer passes, or every answer fails, is dropped and counted."""
    from prefopt.tasks import code

    tok = smol_tokenizer
    enc = lambda t: tok(t, add_special_tokens=False).input_ids  # noqa: E731
    problems = code.problems("train")[:3]
    texts = [code.chat_prompt(p, tok) for p in problems]
    right = [f"```python\n{p.solution}\n```" for p in problems]
    wrong = [f"```python\ndef {p.entry_point}(*args, **kwargs):\n    return None\n```" for p in problems]
    samples = [
        [enc(wrong[0]), enc(right[0]), enc(wrong[0])],  # pass and fail: a pair
        [enc(right[1]), enc(right[1])],  # all pass: dropped
        [enc(wrong[2]), enc(wrong[2])],  # all fail: dropped
    ]
    reward = rewards.get("tests_binary")
    pairs, counts = build_pairs([enc(t) for t in texts], texts, samples, tok, reward, "best_vs_worst", 0.1, 0)
    assert counts == {"prompts": 3, "ties": 2, "too_few_accepted": 0, "pairs": 1}
    assert pairs[0]["chosen_ids"] == enc(right[0]) and pairs[0]["rejected_ids"] == enc(wrong[0])
    assert (pairs[0]["chosen_reward"], pairs[0]["rejected_reward"]) == (1.0, 0.0)


def test_the_code_prompts_keep_their_fixed_split(tiny_dir, tmp_path):
    """prompts: code trains on train problems and evaluates on held-out ones, whatever the seed."""
    from prefopt.tasks import code

    exp = Experiment(quick(tiny_dir, tmp_path, prompts="code", train_prompts=10, eval_prompts=5, seed=3))
    train = {code.chat_prompt(p, exp.tokenizer) for p in code.problems("train")}
    heldout = {code.chat_prompt(p, exp.tokenizer) for p in code.problems("heldout")}
    assert len(exp.train_text) == 10 and set(exp.train_text) <= train
    assert len(exp.eval_text) == 5 and set(exp.eval_text) <= heldout
    with pytest.raises(Exception, match="64 held-out prompts, but eval_prompts = 65"):
        Experiment(quick(tiny_dir, tmp_path, prompts="code", eval_prompts=65))


def test_grpo_in_an_experiment_trains_the_adapter(tiny_dir, tmp_path):
    """Experiment.train_grpo: one epoch of GRPO over the training prompts, groups of `samples`."""
    exp = Experiment(quick(tiny_dir, tmp_path, lr=5e-2))
    model = exp.fresh_policy()
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_B" in k}
    history = exp.train_grpo(model, exp.out / "grpo")
    assert len(history) == 3  # 12 prompts, 4 a step
    assert all("reward" in h and "frac_reward_zero_std" in h for h in history)
    assert any((model.state_dict()[k] - v).abs().max() > 0 for k, v in before.items())


def test_a_users_problems_file_is_a_prompt_set(smol_tokenizer, tmp_path):
    """prompts: code:FILE — split by the file's `split` fields, or every third problem held out."""
    import json

    from prefopt.tasks import prompt_sets

    rows = [
        {"prompt": f"def f{i}(x):\n    '''Return x + {i}.'''", "tests": [f"assert f{i}(1) == {1 + i}"]}
        for i in range(6)
    ]
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    found = prompt_sets.load(f"code:{path}", smol_tokenizer)
    assert len(found.train) == 4 and len(found.heldout) == 2
    assert "f2(x)" in found.heldout[0] and "f5(x)" in found.heldout[1]
    rows[0]["split"] = "heldout"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    found = prompt_sets.load(f"code:{path}", smol_tokenizer)
    assert len(found.train) == 5 and len(found.heldout) == 1 and "f0(x)" in found.heldout[0]
