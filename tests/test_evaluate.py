"""prefopt eval / score: the trained model as a reward model. Tiny runs are trained for real (DPO
with LoRA and as a full fine-tune, KTO, SimPO), and the implicit rewards are checked against
log-probs computed here independently: one plain padded forward, log_softmax, gather."""

from __future__ import annotations

import json
import math

import pytest
import torch

from prefopt import config
from prefopt.cli import main
from prefopt.evaluation.reward_model import evaluate_data, score_data
from prefopt.recipes.train import train

PAIRS = [
    {
        "prompt": f"Question {i}: what is {i} plus {i}?",
        "chosen": f" {2 * i}.",
        "rejected": f" I do not know, maybe {i + 1} or so.",
    }
    for i in range(8)
]
UNPAIRED = [
    {"prompt": p["prompt"], "completion": p["chosen"] if i % 2 == 0 else p["rejected"], "label": i % 2 == 0}
    for i, p in enumerate(PAIRS)
]
PAIR_KEYS = {"model", "data", "loss", "beta", "reward", "shape", "read", "pairs", "policy", "reference", "tokens"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval-data")
    pairs, unpaired = folder / "pairs.jsonl", folder / "unpaired.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    unpaired.write_text("".join(json.dumps(p) + "\n" for p in UNPAIRED))
    return {"pairs": str(pairs), "unpaired": str(unpaired), "folder": folder}


def run(tiny_dir, data_file, folder, name, steps=6, **sections) -> str:
    raw = {
        "model": {"name": tiny_dir},
        "data": {"train": data_file, "max_length": 64, "max_prompt_length": 32},
        "reference": {"cache_dir": str(folder / "ref-cache")},
        "train": {
            "output_dir": str(folder / name),
            "max_steps": steps,
            "batch_size": 2,
            "lr": 1e-2,
            "warmup_ratio": 0.0,
            "progress": False,
            "seed": 0,
            "bf16": False,
            "save_steps": 0,
        },
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    train(config.from_dict(raw))
    return str(folder / name)


@pytest.fixture(scope="module")
def lora_run(tiny_dir, data):
    return run(tiny_dir, data["pairs"], data["folder"], "lora", lora={"enabled": True, "r": 4})


@pytest.fixture(scope="module")
def full_run(tiny_dir, data):
    return run(tiny_dir, data["pairs"], data["folder"], "full")


# -- an independent computation -----------------------------------------------------------------------


def direct_logps(model, rows: list[tuple[list[int], list[int]]], pad_id: int) -> list[float]:
    """Summed log p(response | prompt) of each (prompt ids, response ids): one right-padded forward
    with an ordinary attention mask, log_softmax over the vocabulary, gather the response tokens."""
    seqs = [p + r for p, r in rows]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    with torch.no_grad():
        logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
    out = []
    for i, (p, r) in enumerate(rows):
        positions = torch.arange(len(p) - 1, len(p) + len(r) - 1)  # the logits predicting each response token
        out.append(float(logp[i, positions, torch.tensor(r)].sum()))
    return out


def tokenized(tiny_dir, items):
    from transformers import AutoTokenizer

    from prefopt.data.formats import Pair, Unpaired
    from prefopt.data.tokenize import tokenize_pairs

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    records = [
        Pair(p["prompt"], p["chosen"], p["rejected"])
        if "chosen" in p
        else Unpaired(p["prompt"], p["completion"], p["label"])
        for p in items
    ]
    examples, _ = tokenize_pairs(records, tok, max_length=64, max_prompt_length=32)
    return examples, tok.pad_token_id


def policy_and_reference(tiny_dir, out, lora: bool):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    if lora:
        from peft import PeftModel

        return PeftModel.from_pretrained(base, out).eval(), None
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), base


def direct_pair_rewards(tiny_dir, out, lora: bool, beta: float):
    examples, pad = tokenized(tiny_dir, PAIRS)
    rows = [(ex["prompt_ids"], ex[k]) for ex in examples for k in ("chosen_ids", "rejected_ids")]
    policy, ref = policy_and_reference(tiny_dir, out, lora)
    pol = direct_logps(policy, rows, pad)
    if lora:
        with policy.disable_adapter():
            refl = direct_logps(policy, rows, pad)
    else:
        refl = direct_logps(ref, rows, pad)
    rewards = [beta * (a - b) for a, b in zip(pol, refl)]
    return pol, refl, rewards, [len(r) for _, r in rows]


def read_lines(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


# -- paired ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_pair_rewards_match_direct_computation(kind, request, tiny_dir, data, tmp_path):
    out = request.getfixturevalue(f"{kind}_run")
    m = evaluate_data(out, data["pairs"], batch_size=3, progress=False)
    assert PAIR_KEYS <= set(m) and m["loss"] == "sigmoid" and m["beta"] == 0.1 and m["shape"] == "paired"
    assert m["read"] == {
        "records": 8,
        "items": 8,
        "skipped": 0,
        "skipped_by_reason": {},
        "scored": 8,
        "truncated": 0,
        "dropped_too_long": 0,
    }
    pol, refl, rewards, lengths = direct_pair_rewards(tiny_dir, out, kind == "lora", 0.1)
    rc, rr = rewards[0::2], rewards[1::2]
    margins = [a - b for a, b in zip(rc, rr)]
    assert m["pairs"] == 8
    assert m["policy"]["reward_accuracy"] == pytest.approx(sum(a > b for a, b in zip(rc, rr)) / 8)
    assert m["policy"]["margin_mean"] == pytest.approx(sum(margins) / 8, abs=1e-5)
    assert m["policy"]["reward_chosen"]["mean"] == pytest.approx(sum(rc) / 8, abs=1e-5)
    median = float(torch.tensor(rc, dtype=torch.float64).quantile(0.5))
    assert m["policy"]["reward_chosen"]["p50"] == pytest.approx(median, abs=1e-5)
    assert m["reference"]["likelihood_accuracy"] == sum(a > b for a, b in zip(refl[0::2], refl[1::2])) / 8
    per_token = [x / n for x, n in zip(refl, lengths)]
    assert (
        m["reference"]["likelihood_accuracy_per_token"]
        == sum(a > b for a, b in zip(per_token[0::2], per_token[1::2])) / 8
    )
    assert m["policy"]["likelihood_accuracy"] == sum(a > b for a, b in zip(pol[0::2], pol[1::2])) / 8
    # trained on these pairs: the implicit reward ranks them and the margin is positive
    assert m["policy"]["reward_accuracy"] > 0.5 and m["policy"]["margin_mean"] > 0
    for side in ("policy", "reference"):
        for key in ("likelihood_accuracy", "likelihood_accuracy_per_token"):
            assert 0 <= m[side][key] <= 1

    # score: two lines per pair whose numbers are the direct ones
    path = tmp_path / "scores.jsonl"
    res = score_data(out, data["pairs"], str(path), batch_size=3, progress=False)  # the same batches: the same floats
    lines = read_lines(path)
    assert res["lines"] == len(lines) == 16 and res["out"] == str(path)
    assert [(x["record"], x["role"]) for x in lines] == [(i, r) for i in range(8) for r in ("chosen", "rejected")]
    assert lines[1]["prompt"] == PAIRS[0]["prompt"] and lines[1]["response"] == PAIRS[0]["rejected"]
    for x, a, b, r, n in zip(lines, pol, refl, rewards, lengths):
        assert x["logp"] == pytest.approx(a, abs=1e-4) and x["ref_logp"] == pytest.approx(b, abs=1e-4)
        assert x["reward"] == pytest.approx(r, abs=1e-4) and x["tokens"] == n and x["truncated"] is False
    # and the same rewards as evaluate's
    scored = torch.tensor([x["reward"] for x in lines], dtype=torch.float64).view(8, 2)
    assert m["policy"]["margin_mean"] == pytest.approx(float((scored[:, 0] - scored[:, 1]).mean()), abs=1e-9)
    assert res["policy"] == m["policy"]


def test_default_scores_path_is_inside_the_model_folder(lora_run, data):
    from pathlib import Path

    res = score_data(lora_run, data["pairs"], progress=False)
    assert Path(res["out"]) == Path(lora_run) / "scores" / "pairs.jsonl" and Path(res["out"]).is_file()
    assert not (data["folder"] / "pairs.scores.jsonl").exists()


def test_reference_free_simpo_reward_is_per_token(tiny_dir, data, lora_run, tmp_path):
    out = run(tiny_dir, data["pairs"], data["folder"], "simpo", steps=4, loss={"name": "simpo", "beta": 2.0})
    m = evaluate_data(out, data["pairs"], progress=False)
    assert m["loss"] == "simpo" and m["reward"] == "β/|y|·log π" and m["beta"] == 2.0
    lines = read_lines(score_data(out, data["pairs"], str(tmp_path / "s.jsonl"), progress=False)["out"])
    for x in lines:
        assert x["reward"] == pytest.approx(2.0 * x["logp"] / x["tokens"], rel=1e-9)
    # a reference-free full fine-tune: the baseline is its base model, the same one the LoRA run's
    # disabled adapter gives
    lora_lines = read_lines(score_data(lora_run, data["pairs"], str(tmp_path / "l.jsonl"), progress=False)["out"])
    for a, b in zip(lines, lora_lines):
        assert a["ref_logp"] == pytest.approx(b["ref_logp"], abs=1e-4)
    assert m["policy"]["reward_accuracy"] > 0.5


# -- unpaired ----------------------------------------------------------------------------------------


def test_unpaired_kto_sign_accuracy(tiny_dir, data, tmp_path):
    out = run(tiny_dir, data["unpaired"], data["folder"], "kto", loss={"name": "kto"}, lora={"enabled": True, "r": 4})
    m = evaluate_data(out, data["unpaired"], progress=False)
    assert m["shape"] == "unpaired" and m["loss"] == "kto"
    assert (m["examples"], m["desirable"], m["undesirable"]) == (8, 4, 4)
    lines = read_lines(score_data(out, data["unpaired"], str(tmp_path / "k.jsonl"), progress=False)["out"])
    assert len(lines) == 8 and [x["label"] for x in lines] == [p["label"] for p in UNPAIRED]
    assert all(x["role"] == "completion" and "label" in x for x in lines)

    # independent: β·(log π − log π_ref) from plain forwards, the sign against the labels
    examples, pad = tokenized(tiny_dir, UNPAIRED)
    rows = [(ex["prompt_ids"], ex["completion_ids"]) for ex in examples]
    policy, _ = policy_and_reference(tiny_dir, out, lora=True)
    pol = direct_logps(policy, rows, pad)
    with policy.disable_adapter():
        refl = direct_logps(policy, rows, pad)
    rewards = [0.1 * (a - b) for a, b in zip(pol, refl)]
    for x, r in zip(lines, rewards):
        assert x["reward"] == pytest.approx(r, abs=1e-4)
    labels = [p["label"] for p in UNPAIRED]
    assert m["policy"]["sign_accuracy"] == sum((r > 0) == lab for r, lab in zip(rewards, labels)) / 8
    des = [r for r, lab in zip(rewards, labels) if lab]
    und = [r for r, lab in zip(rewards, labels) if not lab]
    assert m["policy"]["reward_desirable_mean"] == pytest.approx(sum(des) / 4, abs=1e-5)
    assert m["policy"]["reward_undesirable_mean"] == pytest.approx(sum(und) / 4, abs=1e-5)
    assert m["policy"]["reward_auc"] == sum((a > b) + 0.5 * (a == b) for a in des for b in und) / 16
    assert (
        m["policy"]["sign_accuracy"] > 0.5
        and m["policy"]["reward_desirable_mean"] > m["policy"]["reward_undesirable_mean"]
    )
    assert 0 <= m["reference"]["likelihood_auc_per_token"] <= 1


# -- command line ------------------------------------------------------------------------------------


def test_cli_eval_json_and_table(lora_run, data, capsys):
    assert main(["eval", "--model", lora_run, "--data", data["pairs"], "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert PAIR_KEYS <= set(m) and 0 <= m["policy"]["reward_accuracy"] <= 1
    assert main(["eval", "--model", lora_run, "--data", data["pairs"]]) == 0
    table = capsys.readouterr().out
    assert "reward accuracy (r_c > r_r)" in table and "likelihood accuracy (per token)" in table
    assert "policy" in table and "reference" in table and "β = 0.1" in table


def test_cli_score(lora_run, data, capsys, tmp_path):
    dest = tmp_path / "cli.jsonl"
    assert main(["score", "--model", lora_run, "--data", data["pairs"], "--out", str(dest)]) == 0
    assert str(dest) in capsys.readouterr().out and len(read_lines(dest)) == 16


def test_cli_errors(lora_run, data, tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    assert main(["eval", "--model", str(missing), "--data", data["pairs"]]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err
    # data of the wrong shape for the run's loss: one paragraph, code 2
    assert main(["eval", "--model", lora_run, "--data", data["unpaired"]]) == 2
    err = capsys.readouterr().err
    assert "unpaired" in err and "sigmoid" in err and "Traceback" not in err
    assert main(["score", "--model", str(missing), "--data", data["pairs"]]) == 2
    assert str(missing) in capsys.readouterr().err
    # usage errors: argparse's message and exit code 2
    for argv in (
        ["eval", "--model", lora_run, "--data", data["pairs"], "--prompts", "p.txt"],
        ["eval", "--model", lora_run],
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "usage: prefopt eval" in err and "--data" in err and "Traceback" not in err


def test_cli_eval_prompts_samples_policy_and_reference(lora_run, tmp_path, capsys):
    """--prompts: policy and reference sample the same prompts; rewards, win rate and KL are reported."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Question 1: what is 1 plus 1?\nQuestion 5: what is 5 plus 5?\n")
    argv = [
        "eval",
        "--model",
        lora_run,
        "--prompts",
        str(prompts),
        "--reward",
        "length",
        "--samples",
        "3",
        "--max-new-tokens",
        "5",
        "--seed",
        "3",
    ]
    assert main(argv + ["--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["prompt_count"] == 2 and res["samples"] == 6 and res["reward"] == "length"
    assert 0 <= res["win_rate"] <= 1 and math.isfinite(res["kl_nats"])
    assert len(res["examples"]) == 2 and all({"prompt", "policy", "reference"} <= set(e) for e in res["examples"])
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "win rate" in table and "KL" in table
    assert main(argv + ["--json"]) == 0 and json.loads(capsys.readouterr().out) == res  # seeded: same figures
