"""The GRPO trainer: one row per prompt with its G completions is exact; the loss it trains on is
prefopt.grpo's on plain per-sequence log-probs; a run killed with SIGKILL and resumed ends equal to
an uninterrupted one (with a sampled batch reused over μ = 2 steps, a reference, accumulation);
the config's grpo section is checked. Tiny random model, float32, real processes and signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_distributed import free_port
from test_resume import RUNNER  # prefopt's CLI, SIGKILLed while writing the checkpoint of DIE_AT_SAVE_STEP
from transformers import AutoModelForCausalLM, TrainingArguments

from prefopt import config, grpo
from prefopt.data.collate import Collator
from prefopt.errors import PrefoptError
from prefopt.evaluation.report import write_report
from prefopt.modeling import load
from prefopt.modeling.logprobs import padded_tokens, sequence_logps
from prefopt.recipes.grpo import train_grpo
from prefopt.training import checkpoints
from prefopt.training.grpo_trainer import BUFFER_FILE, GRPOTrainer, RepeatedBlocks

WORDS = "cats dogs rain sun tea code books music maps ships".split()


@pytest.fixture()
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("".join(f"Say something about {w}.\n" for w in WORDS))
    return path


def plain_token_logps(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log π(c_t | prompt, c_<t) by a plain forward of [prompt | completion] alone."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def test_a_group_in_one_row_equals_per_sequence_forwards(tiny_dir):
    """[prompt | c_1 | … | c_G] in one row gives every completion token the log-prob of a plain
    forward of [prompt | c_g] (to float rounding), laid out [N, T] with its mask."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tok = load.load_tokenizer(tiny_dir)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 1000, (n,), generator=g).tolist() for n in (7, 3)]
    groups = [
        [torch.randint(5, 1000, (n,), generator=g).tolist() for n in lengths] for lengths in ((4, 1, 6), (2, 5, 3))
    ]
    batch = Collator(tok.pad_token_id)([{"prompt_ids": p, "group_ids": c} for p, c in zip(prompts, groups)])
    assert batch["input_ids"].shape[0] == 2  # one row per prompt
    with torch.no_grad():
        out = sequence_logps(model, batch, tokens=True)
    logp, mask = padded_tokens(out["token_logps"], batch["score_seq"], int(batch["n_seqs"]))
    assert logp.shape == (6, 6)
    i = 0
    for p, group in zip(prompts, groups):
        for c in group:
            with torch.no_grad():
                expected = plain_token_logps(model, p, c)
            assert mask[i].sum() == len(c) and not mask[i, len(c) :].any()
            torch.testing.assert_close(logp[i, : len(c)], expected, atol=2e-5, rtol=0)
            i += 1


def make_trainer(tiny_dir, tmp_path, reward, **kw) -> GRPOTrainer:
    tok = load.load_tokenizer(tiny_dir)
    prompts = [{"prompt": f"Tell me about {w}.", "prompt_ids": tok(f"Tell me about {w}.").input_ids} for w in WORDS[:4]]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        use_cpu=True,
        report_to="none",
        seed=0,
        disable_tqdm=True,
        save_strategy="no",
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    return GRPOTrainer(model, args, reward=reward, prompts=prompts, processing_class=tok, **kw)


def word_count(prompts, completions):
    return [float(len(c.split())) for c in completions]


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_the_trained_loss_is_grpo_policy_loss_on_plain_log_probs(tiny_dir, tmp_path, loss_type):
    """A sampled micro-batch (G = 3, 6-token completions): the trainer's loss equals
    grpo.policy_loss on log-probs from plain per-sequence forwards, and its rewards and advantages
    are the reward function's values and grpo.group_advantages of them."""
    trainer = make_trainer(
        tiny_dir, tmp_path, word_count, num_generations=3, max_completion_length=6, loss_type=loss_type, beta=0.0
    )
    prompts = trainer.train_dataset[:2]
    batch = trainer._sampled_batch(prompts, step=0, micro=0)
    tok = trainer.processing_class
    completions = [batch_completion(batch, i) for i in range(6)]
    rewards = torch.tensor(word_count(None, [tok.decode(c, skip_special_tokens=True) for c in completions])).reshape(
        2, 3
    )
    advantages, _ = grpo.group_advantages(rewards, "group")
    torch.testing.assert_close(batch["advantages"], advantages.reshape(-1))
    trainer.model.train()
    loss = trainer.compute_loss(
        trainer.model, dict(batch), num_items_in_batch=torch.tensor(float(batch["score_seq"].numel()))
    )
    rows = [plain_token_logps(trainer.model, prompts[i // 3]["prompt_ids"], completions[i]) for i in range(6)]
    width = max(len(r) for r in rows)
    logp = torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in rows])
    mask = torch.stack([torch.arange(width) < len(r) for r in rows])
    expected, _ = grpo.policy_loss(
        logp,
        None,
        None,
        advantages.reshape(-1),
        mask,
        loss_type=loss_type,
        max_completion_length=6,
        num_items_in_batch=float(mask.sum()),
    )
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def batch_completion(batch: dict, seq: int) -> list[int]:
    """The token ids of sequence `seq` of a collated batch (its scored tokens)."""
    return batch["score_tgt"][batch["score_seq"] == seq].tolist()


def test_sampling_is_seeded_by_step_and_leaves_the_trainers_random_state_alone(tiny_dir, tmp_path):
    trainer = make_trainer(tiny_dir, tmp_path, word_count, num_generations=2, max_completion_length=5)
    prompts = trainer.train_dataset[:2]
    state = torch.random.get_rng_state()
    a = trainer._sampled_batch(prompts, step=3, micro=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = trainer._sampled_batch(prompts, step=3, micro=0)
    c = trainer._sampled_batch(prompts, step=4, micro=0)
    assert torch.equal(a["score_tgt"], b["score_tgt"])
    assert not torch.equal(a["score_tgt"], c["score_tgt"])


def test_repeated_blocks_give_each_step_its_prompts_mu_times():
    """Blocks of one step's prompts, each twice in a row; the short last block filled from the start
    of the epoch's order, so every step has a whole block; another order each epoch."""
    sampler = RepeatedBlocks(10, block=4, repeats=2, seed=0)
    order = list(sampler)
    assert len(order) == len(sampler) == 24
    blocks = [order[s : s + 4] for s in range(0, 24, 4)]
    assert blocks[0] == blocks[1] and blocks[2] == blocks[3] and blocks[4] == blocks[5]
    assert sorted(blocks[0] + blocks[2] + blocks[4][:2]) == list(range(10))
    assert blocks[4][2:] == blocks[0][:2]
    sampler.set_epoch(1)
    assert list(sampler) != order


# ---- a whole run: checkpoints, SIGKILL, resume ----


def grpo_config(tiny_dir, prompts_file, out: Path, **grpo_keys) -> dict:
    return {
        "model": {"name": tiny_dir},
        "lora": {"enabled": True, "r": 4, "alpha": 8},
        "grpo": {
            "prompts": str(prompts_file),
            "reward": "length",
            "num_generations": 3,
            "max_completion_length": 6,
            **grpo_keys,
        },
        "train": {
            "output_dir": str(out),
            "epochs": 1.0,
            "batch_size": 2,
            "grad_accum": 2,
            "lr": 5e-2,
            "warmup_ratio": 0.0,
            "progress": False,
            "seed": 0,
            "bf16": False,
            "save_steps": 1,
            "save_total_limit": 0,
        },
    }


def test_grpo_killed_then_resumed_equals_uninterrupted(tiny_dir, prompts_file, tmp_path):
    """μ = 2 (each sampled batch serves two optimizer steps, the ratio clipped against the sampling
    policy), β = 0.1 (the LoRA reference), 2 accumulated micro-batches, 10 prompts in blocks of 4:
    killed while writing checkpoint-4, the run resumes from checkpoint-3 — in the middle of a cycle, whose sampled batch
    the checkpoint holds — and ends with the uninterrupted run's weights and per-step log."""
    keys = dict(num_iterations=2, beta=0.1, epsilon=0.1)
    ref_out = tmp_path / "uninterrupted"
    summary = train_grpo(grpo_config(tiny_dir, prompts_file, ref_out, **keys))
    assert summary["steps"] == 6  # 10 prompts in blocks of 2 × 2: 3 blocks (the last filled up), each twice
    out = tmp_path / "killed"
    cfg_path = tmp_path / "killed.yaml"
    cfg_path.write_text(yaml.safe_dump(grpo_config(tiny_dir, prompts_file, out, **keys)))
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    cmd = [sys.executable, str(runner), "grpo", str(cfg_path)]
    env = {**os.environ, "DIE_AT_SAVE_STEP": "4"}
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == -signal.SIGKILL
    assert checkpoints.latest(out) == out / "checkpoint-3"
    assert (out / "checkpoint-3" / BUFFER_FILE.format(rank=0)).is_file()
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = load_file(str(ref_out / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert (
        max(
            (a[k] - load_file(str(ref_out / "checkpoint-1" / "adapter_model.safetensors"))[k]).abs().max().item()
            for k in a
        )
        > 0
    )
    rows = lambda p: [r for r in map(json.loads, (p / "metrics.jsonl").read_text().splitlines()) if "loss" in r]  # noqa: E731
    ref_rows, rows_b = rows(ref_out), rows(out)
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(ref_rows, rows_b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
        assert x.get("reward") == y.get("reward")
    assert any(r.get("clip_ratio/region_mean", 0) > 0 or r.get("kl", 0) > 0 for r in ref_rows)
    card = (out / "README.md").read_text()
    assert "trained with GRPO on the reward `length`" in card and "prefopt grpo prefopt.yaml" in card
    assert ": GRPO LoRA adapter" in card and "- grpo" in card and "- dpo" not in card
    assert "| mean reward of the sampled completions |" in card and "implicit reward" not in card
    page = write_report(out).read_text()
    assert 'alt="Reward of the sampled completions"' in page and 'alt="Groups without signal"' in page
    assert "GRPO" in page and 'alt="Reward margin"' not in page


def test_the_grpo_section_is_checked(tmp_path):
    with pytest.raises(PrefoptError, match=r"grpo.num_generations' must be >= 2"):
        config.from_dict({"grpo": {"num_generations": 1}})
    with pytest.raises(PrefoptError, match=r"grpo.loss_type' must be one of .*did you mean 'dapo'"):
        config.from_dict({"grpo": {"loss_type": "dapp"}})
    with pytest.raises(PrefoptError, match=r"grpo.epsilon' must be in \(0, 1\)"):
        config.from_dict({"grpo": {"epsilon": 1.5}})
    assert config.from_dict({"grpo": {"scale_rewards": False}}).grpo.scale_rewards == "none"
    assert config.from_dict({"grpo": {"scale_rewards": True}}).grpo.scale_rewards == "group"


def test_prefopt_grpo_with_a_bad_key_exits_2(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "prefopt", "grpo", "--grpo.num_generation", "4"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "did you mean 'num_generations'" in done.stderr


def test_prefopt_grpo_on_the_code_task_scores_in_the_sandbox(tiny_dir, tmp_path):
    """The default prompts and reward (the code task, its tests run in the sandbox) on the tiny
    model: its random answers fail every test, so every group is without signal — logged as such."""
    raw = grpo_config(tiny_dir, "code", tmp_path / "code", reward="tests", limit=4, num_generations=2)
    raw["train"].update(save_steps=0)
    summary = train_grpo(raw)
    assert summary["prompts"] == 4 and summary["steps"] == 1
    row = next(
        r for r in map(json.loads, (tmp_path / "code" / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    )
    assert row["rewards/tests/mean"] == 0.0 and row["frac_reward_zero_std"] == 1.0


def test_grpo_under_ddp_keeps_each_process_batch_and_resumes_it(tiny_dir, prompts_file, tmp_path):
    """2-process CPU DDP (torchrun, gloo), μ = 2: each process samples its own prompts' groups and
    saves its own cycle batch in every checkpoint; resumed from the mid-cycle checkpoint-3 (the
    later checkpoints and the final adapter removed), the run ends with the same adapter."""
    import shutil

    out = tmp_path / "ddp"
    raw = grpo_config(tiny_dir, prompts_file, out, num_iterations=2)
    raw["train"].update(batch_size=1, grad_accum=2)
    cfg_path = tmp_path / "ddp.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))

    def torchrun(*extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
        cmd += ["--master_port", str(free_port()), "-m", "prefopt", "grpo", str(cfg_path), *extra]
        done = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]

    torchrun()
    final = load_file(str(out / "adapter_model.safetensors"))
    batches = [load_file(str(out / "checkpoint-3" / BUFFER_FILE.format(rank=r))) for r in (0, 1)]
    assert not torch.equal(batches[0]["0/input_ids"], batches[1]["0/input_ids"])  # each its own prompts
    for folder in out.iterdir():
        if folder.name.startswith("checkpoint-") and int(folder.name.split("-")[1]) > 3:
            shutil.rmtree(folder)
    (out / "adapter_model.safetensors").unlink()
    torchrun("--resume")
    resumed = load_file(str(out / "adapter_model.safetensors"))
    assert max((final[k] - resumed[k]).abs().max().item() for k in final) <= 1e-6


def test_a_malformed_problems_file_exits_2_naming_file_line_and_field(tmp_path):
    """prefopt grpo on your problems (grpo.prompts code:FILE, reward tests:FILE): a bad line stops
    the run before anything is loaded, with exit code 2 and the file, line and field."""
    bad = tmp_path / "problems.jsonl"
    bad.write_text(
        '{"prompt": "def f(x):", "tests": ["assert f(1) == 1"]}\n{"prompt": "def g(x):", "tests": ["assert (g(1"]}\n'
    )
    for key, value in (("grpo.reward", f"tests:{bad}"), ("grpo.prompts", f"code:{bad}")):
        cmd = [sys.executable, "-m", "prefopt", "grpo", f"--{key}", value, "--train.output_dir", str(tmp_path / "out")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 2, done.stderr[-2000:]
        assert f"{bad} line 2: field 'tests': test 1 is not valid Python" in done.stderr
        assert "Traceback" not in done.stderr
