"""Safety: a training run writes only into its output folder and the prefopt cache, leaves the data
untouched, needs no network for local models and data, writes no pickle, and refuses pickled
weights."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from prefopt.cli import main


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_training_writes_only_output_and_cache_offline(tmp_path, tiny_dir):
    world = tmp_path / "world"  # everything the run can see: home, cwd, data, model, temp
    (world / "home").mkdir(parents=True)
    (world / "cwd").mkdir()
    (world / "data").mkdir()
    data = world / "data" / "pairs.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"Q{i}?", "chosen": f" {i}.", "rejected": f" not {i}."}) + "\n" for i in range(8))
    )
    import shutil

    shutil.copytree(tiny_dir, world / "model")
    cfg = world / "cwd" / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {"name": str(world / "model")},
                "data": {"train": str(data), "max_length": 32, "max_prompt_length": 16},
                "lora": {"enabled": True, "r": 4, "merge": True},
                "train": {
                    "output_dir": str(world / "out"),
                    "max_steps": 2,
                    "batch_size": 2,
                    "save_steps": 1,
                    "progress": False,
                    "bf16": False,
                },
            }
        )
    )
    before = snapshot(world)
    env = {
        **os.environ,
        "HOME": str(world / "home"),
        "PREFOPT_CACHE": str(world / "cache"),
        "HF_HOME": str(world / "home" / "hf"),
        "XDG_CACHE_HOME": str(world / "home" / "xdg"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TMPDIR": str(world / "tmp"),
    }
    (world / "tmp").mkdir()
    res = subprocess.run(
        [sys.executable, "-m", "prefopt", "train", str(cfg)],
        cwd=world / "cwd",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    after = snapshot(world)
    changed = {p for p in after if before.get(p) != after[p]}
    allowed = ("out/", "cache/", "tmp/", "home/")  # home/: only library caches redirected above, listed below
    assert all(p.startswith(allowed) for p in changed), sorted(changed)
    assert not any(p.startswith("home/") for p in changed), sorted(p for p in changed if p.startswith("home/"))
    assert all(before[p] == after[p] for p in before), "an input file was modified"
    out_files = [p for p in changed if p.startswith("out/")]
    assert "out/adapter_model.safetensors" in out_files and "out/merged/model.safetensors" in out_files
    # the final model folder holds no pickle (checkpoints keep transformers' optimizer/RNG .pt files,
    # which it loads with weights_only=True)
    finals = [p for p in out_files if not p.startswith("out/checkpoint-")]
    assert not [p for p in finals if p.endswith((".bin", ".pt", ".pth", ".pkl"))], finals


def test_pickled_weights_are_refused(tmp_path, tiny_dir, capsys):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    for f in Path(tiny_dir).glob("tokenizer*"):
        (folder / f.name).write_bytes(f.read_bytes())
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Q?", "chosen": " yes.", "rejected": " no."}) + "\n")
    code = main(
        ["train", "--model.name", str(folder), "--data.train", str(data), "--train.output_dir", str(tmp_path / "out")]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "pickled" in err and str(folder) in err, err


def test_report_to_tensorboard_writes_event_files(tmp_path, tiny_dir):
    from prefopt import config
    from prefopt.recipes.train import train

    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"Q{i}?", "chosen": f" {i}.", "rejected": f" not {i}."}) + "\n" for i in range(4))
    )
    out = tmp_path / "out"
    train(
        config.from_dict(
            {
                "model": {"name": tiny_dir},
                "data": {"train": str(data), "max_length": 32, "max_prompt_length": 16},
                "reference": {"cache_dir": str(tmp_path / "ref")},
                "train": {
                    "output_dir": str(out),
                    "max_steps": 2,
                    "batch_size": 2,
                    "progress": False,
                    "report_to": "tensorboard",
                    "bf16": False,
                },
            }
        )
    )
    events = list(out.rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100
    assert (out / "metrics.jsonl").exists()  # the JSONL log is always written


def test_report_to_an_integration_that_is_not_installed_is_a_clear_error(capsys):
    import importlib.util

    missing = next((n for n in ("wandb", "mlflow", "trackio", "comet_ml") if importlib.util.find_spec(n) is None), None)
    if missing is None:
        import pytest

        pytest.skip("every checked integration is installed")
    code = main(["train", "--data.train", "x.jsonl", "--train.report_to", missing])
    err = capsys.readouterr().err
    assert code == 2 and f"pip install {missing}" in err and "train.report_to" in err
    assert main(["train", "--data.train", "x.jsonl", "--train.report_to", "slack"]) == 2
    assert "expected none, all" in capsys.readouterr().err
