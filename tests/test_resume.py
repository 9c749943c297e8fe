"""Resume after a crash: `prefopt train --resume` killed with SIGKILL at random points (and in the
middle of a checkpoint save, and just before the final save) ends with the weights and the
per-step log of an uninterrupted run; Ctrl-C stops cleanly with a checkpoint. Real processes,
real signals, the tiny model in float32."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from prefopt import config
from prefopt.recipes.train import train
from prefopt.training import checkpoints
from prefopt.training.trainer import REFERENCE_FILE

# Runs prefopt's CLI; DIE_AT_SAVE_STEP kills the process in the middle of writing that step's
# checkpoint (model and optimizer written, RNG state and trainer_state.json not yet);
# DIE_BEFORE_FINAL_SAVE kills it after the last checkpoint, before the final model is written.
RUNNER = """
import os, signal, sys
import prefopt.recipes.train
from transformers import Trainer

die_at = int(os.environ.get("DIE_AT_SAVE_STEP", "-1"))
original = Trainer._save_rng_state
def dying(self, output_dir):
    if self.state.global_step == die_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, output_dir)
Trainer._save_rng_state = dying
if os.environ.get("DIE_BEFORE_FINAL_SAVE"):
    prefopt.recipes.train._save_final = lambda *a: os.kill(os.getpid(), signal.SIGKILL)

# NAN_IN_STEP: a weight becomes NaN during that step's backward (a divergence the logged loss,
# computed before the update, does not show yet); DIE_AT_NONFINITE: SIGKILL when the checkpoint
# check finds the non-finite state
import torch
from prefopt.training.trainer import PreferenceTrainer
nan_step = int(os.environ.get("NAN_IN_STEP", "-1"))
original_step = Trainer.training_step
def diverging(self, *args, **kwargs):
    loss = original_step(self, *args, **kwargs)
    if self.state.global_step + 1 == nan_step:
        with torch.no_grad():
            next(p for p in self.model.parameters() if p.requires_grad).view(-1)[0] = float("nan")
    return loss
Trainer.training_step = diverging
original_check = PreferenceTrainer.state_is_finite
def dying_check(self):
    finite = original_check(self)
    if not finite and os.environ.get("DIE_AT_NONFINITE"):
        os.kill(os.getpid(), signal.SIGKILL)
    return finite
PreferenceTrainer.state_is_finite = dying_check

from prefopt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def pairs(n):
    return [
        {
            "prompt": f"Question {i}: what is {i} plus {i}?",
            "chosen": f" {2 * i}.",
            "rejected": f" I do not know, maybe {i + 1} or so.",
        }
        for i in range(n)
    ]


@pytest.fixture()
def setup(tmp_path, tiny_dir):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs(16)))
    raw = {
        "model": {"name": tiny_dir},
        "data": {"train": str(data), "max_length": 64, "max_prompt_length": 32},
        "reference": {"cache_dir": str(tmp_path / "ref-cache")},
        # 8 steps per epoch; 1.5 epochs: the kills also land in the second epoch
        "train": {
            "epochs": 1.5,
            "batch_size": 2,
            "lr": 1e-2,
            "warmup_ratio": 0.0,
            "progress": False,
            "seed": 0,
            "bf16": False,
            "save_steps": 2,
            "save_total_limit": 2,
        },
    }
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    return tmp_path, raw, runner


def write_config(tmp_path, raw, out, **train_keys) -> Path:
    raw = json.loads(json.dumps(raw))
    raw["train"].update(output_dir=str(out), **train_keys)
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def launch(runner, cfg_path, resume, env=None, log=None, overwrite=False):
    args = [sys.executable, str(runner), "train", str(cfg_path)] + (["--resume"] if resume else [])
    args += ["--overwrite"] if overwrite else []
    return subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=log or subprocess.DEVNULL, env={**os.environ, **(env or {})}
    )


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "loss" in row:
            steps.append(row["step"])
    return steps


def train_rows(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def max_abs_diff(a: Path, b: Path) -> float:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    return max((ta[k] - tb[k]).abs().max().item() for k in ta)


def test_sigkill_anywhere_then_resume_equals_uninterrupted(setup):
    tmp_path, raw, runner = setup
    ref_out = tmp_path / "uninterrupted"
    train(config.load(str(write_config(tmp_path, raw, ref_out)), []))
    out = tmp_path / "killed"
    cfg = write_config(tmp_path, raw, out)

    # 1. killed in the middle of writing checkpoint-4: checkpoint-2 stays the newest complete one
    p = launch(runner, cfg, resume=False, env={"DIE_AT_SAVE_STEP": "4"})
    assert p.wait(120) == -signal.SIGKILL
    assert (out / checkpoints.STAGING / "checkpoint-4").is_dir()  # half written ...
    assert not (out / "checkpoint-4").exists()  # ... and never visible
    assert checkpoints.latest(out) == out / "checkpoint-2"

    # 2. killed at random points of resumed runs (seeded, so the test is repeatable)
    rng = random.Random(1234)
    kills = 0
    for _ in range(3):
        start = max(logged_steps(out), default=0)
        if start >= 10:
            break
        target = start + rng.randint(1, 3)
        p = launch(runner, cfg, resume=True)
        while p.poll() is None and max(logged_steps(out), default=0) < target:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.05))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(60)
            kills += 1
    assert kills >= 2

    # 3. killed after the last checkpoint, before the final model is written
    p = launch(runner, cfg, resume=True, env={"DIE_BEFORE_FINAL_SAVE": "1"})
    assert p.wait(120) == -signal.SIGKILL
    assert checkpoints.latest(out) == out / "checkpoint-12"
    assert not (out / "model.safetensors").exists()

    # 4. the last resume only writes the final model
    with open(tmp_path / "last.log", "w") as log:
        assert launch(runner, cfg, resume=True, log=log).wait(120) == 0
    assert "resuming from" in (tmp_path / "last.log").read_text()

    assert max_abs_diff(ref_out / "model.safetensors", out / "model.safetensors") <= 1e-6
    # every step logged exactly once, with the uninterrupted run's values
    a, b = train_rows(ref_out), train_rows(out)
    assert [r["step"] for r in b] == list(range(1, 13))
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6)
        assert rb["rewards/margins"] == pytest.approx(ra["rewards/margins"], abs=1e-6)
    assert not (out / checkpoints.STAGING).exists()
    assert not (out / "training_args.bin").exists()  # no pickle in the output
    assert sorted(p.name for p in checkpoints.complete(out)) == ["checkpoint-10", "checkpoint-12"]


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_run(setup):
    tmp_path, raw, runner = setup
    raw["lora"] = {"enabled": True, "r": 4}
    raw["train"].update(epochs=3.0, lr=5e-2)  # 24 steps: time for the signal to land mid-run
    ref_out = tmp_path / "uninterrupted"
    train(config.load(str(write_config(tmp_path, raw, ref_out, save_steps=0)), []))
    out = tmp_path / "stopped"
    cfg = write_config(tmp_path, raw, out, save_steps=0)  # no periodic checkpoints: Ctrl-C makes one

    log_path = tmp_path / "stopped.log"
    with open(log_path, "w") as log:
        p = launch(runner, cfg, resume=False, log=log)
        while p.poll() is None and max(logged_steps(out), default=0) < 3:
            time.sleep(0.002)
        p.send_signal(signal.SIGINT)
        assert p.wait(120) == 130
    text = log_path.read_text()
    assert "continue with --resume" in text and "Traceback" not in text
    stopped = checkpoints.latest(out)
    assert stopped is not None and 3 <= int(stopped.name.split("-")[1]) < 24
    assert not (out / "adapter_model.safetensors").exists()  # an unfinished run writes no final model

    assert launch(runner, cfg, resume=True).wait(120) == 0
    assert max_abs_diff(ref_out / "adapter_model.safetensors", out / "adapter_model.safetensors") <= 1e-6
    assert [r["step"] for r in train_rows(out)] == list(range(1, 25))


def test_a_kill_during_a_nonfinite_stop_then_resume_stops_the_same_way(setup):
    """A weight turns NaN in step 6 (a save step): the uninterrupted run stops there, publishes no
    checkpoint-6 and names checkpoint-4 as the last finite one. Killed at that very check and
    resumed, the run redoes steps 5-6 from checkpoint-4 and ends the same way, its checkpoints
    equal to the uninterrupted run's."""
    tmp_path, raw, runner = setup
    env = {"NAN_IN_STEP": "6"}
    ref_out = tmp_path / "nan-uninterrupted"
    with open(tmp_path / "ref.log", "w") as log:
        assert launch(runner, write_config(tmp_path, raw, ref_out), resume=False, env=env, log=log).wait(120) == 2
    message = (tmp_path / "ref.log").read_text()
    assert "step 6" in message and "checkpoint-4 is the last checkpoint verified finite" in message
    assert sorted(p.name for p in checkpoints.complete(ref_out)) == ["checkpoint-2", "checkpoint-4"]

    out = tmp_path / "nan-killed"
    cfg = write_config(tmp_path, raw, out)
    assert launch(runner, cfg, resume=False, env={**env, "DIE_AT_NONFINITE": "1"}).wait(120) == -signal.SIGKILL
    assert not (out / "checkpoint-6").exists()
    with open(tmp_path / "resumed.log", "w") as log:
        assert launch(runner, cfg, resume=True, env=env, log=log).wait(120) == 2
    text = (tmp_path / "resumed.log").read_text()
    assert "resuming from" in text and "checkpoint-4 is the last checkpoint verified finite" in text
    assert "Traceback" not in text
    assert sorted(p.name for p in checkpoints.complete(out)) == ["checkpoint-2", "checkpoint-4"]
    for name in ("checkpoint-2", "checkpoint-4"):
        assert max_abs_diff(ref_out / name / "model.safetensors", out / name / "model.safetensors") == 0
    assert not (out / "model.safetensors").exists()


def test_latest_ignores_partial_and_incomplete_folders(tmp_path):
    for name, complete in (("checkpoint-2", True), ("checkpoint-10", True), ("checkpoint-12", False)):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / checkpoints.COMPLETE_MARKER).write_text("{}")
    (tmp_path / checkpoints.STAGING / "checkpoint-14").mkdir(parents=True)
    (tmp_path / checkpoints.STAGING / "checkpoint-14" / checkpoints.COMPLETE_MARKER).write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert checkpoints.latest(tmp_path) == tmp_path / "checkpoint-10"  # 10 > 2 numerically, 12 incomplete
    checkpoints.prune(tmp_path, 1)
    assert [p.name for p in checkpoints.complete(tmp_path)] == ["checkpoint-10"]
    assert checkpoints.latest(tmp_path / "absent") is None


def test_publish_replaces_an_existing_checkpoint_of_the_same_step(tmp_path):
    final = tmp_path / "checkpoint-4"
    final.mkdir()
    (final / "old.txt").write_text("old")
    staged = tmp_path / checkpoints.STAGING / "checkpoint-4"
    staged.mkdir(parents=True)
    (staged / "new.txt").write_text("new")
    checkpoints.publish(staged, final)
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert not staged.exists() and not (tmp_path / checkpoints.STAGING / "old-checkpoint-4").exists()


def test_resume_without_checkpoint_starts_from_the_beginning(setup, caplog):
    tmp_path, raw, _ = setup
    out = tmp_path / "fresh"
    summary = train(config.load(str(write_config(tmp_path, raw, out, max_steps=2)), []), resume=True)
    assert summary["steps"] == 2 and summary["resumed_from"] is None
    assert "no complete checkpoint" in caplog.text


def test_resume_restores_the_running_state_of_a_stateful_loss(setup):
    """BCO's running reward mean δ is part of the checkpoint: resuming from step 4 of 8 gives the
    uninterrupted run's weights, which it would not with δ reset."""
    tmp_path, raw, _ = setup
    raw["loss"] = {"name": "bco_pair", "beta": 0.1}
    out = tmp_path / "bco"
    cfg = config.load(str(write_config(tmp_path, raw, out, epochs=1.0, save_steps=4, save_total_limit=0)), [])
    train(cfg)
    uninterrupted = load_file(str(out / "model.safetensors"))
    state = json.loads((out / "checkpoint-4" / "prefopt_loss_state.json").read_text())
    assert state["count"] == 4 * 2 * 2 and state["mean"] != 0  # 4 steps of 2 pairs, 2 rewards each
    import shutil

    shutil.rmtree(out / "checkpoint-8")
    (out / "model.safetensors").unlink()
    summary = train(cfg, resume=True)
    assert summary["resumed_from"].endswith("checkpoint-4")
    resumed = load_file(str(out / "model.safetensors"))
    assert max((uninterrupted[k] - resumed[k]).abs().max().item() for k in resumed) <= 1e-6


def test_tr_dpo_killed_then_resumed_equals_uninterrupted(setup):
    """TR-DPO's moving reference (updated every 3 steps) is saved with each checkpoint: killed while
    writing checkpoint-6 and resumed from checkpoint-4 (the reference moved at step 3), the run
    ends with the uninterrupted run's weights and reference."""
    tmp_path, raw, runner = setup
    raw["loss"] = {"name": "tr_dpo", "tr_tau": 3, "tr_alpha": 0.5}
    ref_out = tmp_path / "tr-uninterrupted"
    train(config.load(str(write_config(tmp_path, raw, ref_out)), []))
    out = tmp_path / "tr-killed"
    cfg = write_config(tmp_path, raw, out)
    assert launch(runner, cfg, resume=False, env={"DIE_AT_SAVE_STEP": "6"}).wait(120) == -signal.SIGKILL
    assert checkpoints.latest(out) == out / "checkpoint-4"
    assert (out / "checkpoint-4" / REFERENCE_FILE).is_file()
    assert launch(runner, cfg, resume=True).wait(120) == 0
    assert max_abs_diff(ref_out / "model.safetensors", out / "model.safetensors") <= 1e-6
    for name in ("checkpoint-10", "checkpoint-12"):
        assert max_abs_diff(ref_out / name / REFERENCE_FILE, out / name / REFERENCE_FILE) <= 1e-6
