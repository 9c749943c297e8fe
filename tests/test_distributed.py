"""Past one process, through the existing engine: 2-process CPU DDP (torchrun, gloo) gives the loss
trajectory and weights of one process with the same global batch, and of gradient accumulation;
the reference log-probs are precomputed under DDP (each rank computes half the batches, one
all-reduce shares them, rank 0 writes the cache; a second run reads it on both ranks) and
KTO's KL baseline is taken over the global batch. Batch 1 × accumulation 8 equals batch 8 ×
accumulation 1 (the gradient-accumulation scaling bug must not exist here)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from prefopt import config
from prefopt.recipes.train import train

PAIRS = [
    {
        "prompt": f"Question {i}: what is {i} plus {i}?",
        "chosen": f" {2 * i}.",
        "rejected": f" I do not know, maybe {i + 1} or so.",
    }
    for i in range(16)
]
# three in four desirable, all alike: the policy raises the mismatched completions too, so the KL
# baseline z0 is positive and enters the loss
UNPAIRED = [
    {
        "prompt": f"Question {i}: what is {i} plus {i}?",
        "completion": f" {2 * i}." if i % 4 else f" Maybe {i + 3}, I am not sure.",
        "label": bool(i % 4),
    }
    for i in range(16)
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_config(tmp_path, tiny_dir, rows, name, **train_keys) -> dict:
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {
        "model": {"name": tiny_dir},
        "data": {"train": str(data), "max_length": 64, "max_prompt_length": 32},
        "reference": {"cache_dir": str(tmp_path / f"ref-cache-{name}")},
        "train": {
            "max_steps": 4,
            "lr": 1e-2,
            "warmup_ratio": 0.0,
            "progress": False,
            "seed": 0,
            "bf16": False,
            "save_steps": 0,
            "output_dir": str(tmp_path / name),
        },
    }
    raw["train"].update(train_keys)
    return raw


def torchrun(tmp_path, raw: dict, nproc: int) -> Path:
    cfg = tmp_path / f"{Path(raw['train']['output_dir']).name}.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "prefopt",
        "train",
        str(cfg),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return Path(raw["train"]["output_dir"])


def in_process(raw: dict) -> Path:
    train(config.from_dict(raw))
    return Path(raw["train"]["output_dir"])


def rows(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def same_run(a: Path, b: Path, keys, weights="model.safetensors"):
    ra, rb = rows(a), rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [1, 2, 3, 4]
    for x, y in zip(ra, rb):
        for k in keys:
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=3e-6), (k, x, y)  # metrics logged to 6 decimals
    assert abs(ra[-1]["loss"] - ra[0]["loss"]) > 1e-2  # it trained: equal metrics prove something
    wa, wb = load_file(str(a / weights)), load_file(str(b / weights))
    # Adam divides by sqrt(v): where a gradient is near zero, summation-order rounding grows to ~1e-5;
    # 1e-4 is 1 % of one step's move at lr 1e-2
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


def test_ddp_two_processes_equal_one_process_and_grad_accum(tmp_path, tiny_dir):
    keys = ("loss", "grad_norm", "rewards/margins", "rewards/chosen", "logps/rejected", "logps/ref_chosen")
    ddp = torchrun(tmp_path, base_config(tmp_path, tiny_dir, PAIRS, "ddp", batch_size=2), nproc=2)
    # a fresh reference cache for every run: under DDP each rank computed half of it
    one = in_process(base_config(tmp_path, tiny_dir, PAIRS, "one", batch_size=4))
    accum = in_process(base_config(tmp_path, tiny_dir, PAIRS, "accum", batch_size=2, grad_accum=2))
    same_run(one, ddp, keys)
    same_run(one, accum, keys)
    cached = list((tmp_path / "ref-cache-ddp").glob("*.safetensors"))
    assert len(cached) == 1
    # a second DDP run on the same data: both ranks read the cache (nobody rewrites it)
    stamp = cached[0].stat().st_mtime_ns
    raw = base_config(tmp_path, tiny_dir, PAIRS, "ddp", batch_size=2)
    raw["train"]["output_dir"] = str(tmp_path / "ddp-again")
    again = torchrun(tmp_path, raw, nproc=2)
    same_run(one, again, keys)
    assert cached[0].stat().st_mtime_ns == stamp
    assert len(list((tmp_path / "ref-cache-ddp").glob("*"))) == 1  # no temporary file left


def test_lora_under_ddp_equals_one_process(tmp_path, tiny_dir):
    """A LoRA adapter under DDP (transformers would search a peft model's forward output for unused
    parameters, and the engine's loss does not come from that output: prefopt turns the search off)."""
    keys = ("loss", "grad_norm", "rewards/margins", "logps/rejected")
    lora = {"enabled": True, "r": 4, "alpha": 8}
    raw = {**base_config(tmp_path, tiny_dir, PAIRS, "lora-ddp", batch_size=2), "lora": lora}
    ddp = torchrun(tmp_path, raw, nproc=2)
    one = in_process({**base_config(tmp_path, tiny_dir, PAIRS, "lora-one", batch_size=4), "lora": lora})
    same_run(one, ddp, keys, weights="adapter_model.safetensors")


def test_kto_under_ddp_takes_its_kl_baseline_over_the_global_batch(tmp_path, tiny_dir):
    keys = ("loss", "grad_norm", "kl", "rewards/accuracies")
    loss = {"name": "kto", "beta": 0.1}
    raw = base_config(tmp_path, tiny_dir, UNPAIRED, "kto-ddp", batch_size=2)
    ddp = torchrun(tmp_path, {**raw, "loss": loss}, nproc=2)
    raw = base_config(tmp_path, tiny_dir, UNPAIRED, "kto-one", batch_size=4)
    one = in_process({**raw, "loss": loss})
    same_run(one, ddp, keys)
    assert any(r["kl"] > 0.1 for r in rows(one))  # the baseline is not clamped to zero: it shapes the loss


def test_batch_1_accum_8_equals_batch_8_accum_1(tmp_path, tiny_dir):
    keys = ("loss", "grad_norm", "rewards/margins", "rewards/chosen", "logps/rejected")
    a = in_process(base_config(tmp_path, tiny_dir, PAIRS, "b8", batch_size=8, grad_accum=1))
    b = in_process(base_config(tmp_path, tiny_dir, PAIRS, "b1x8", batch_size=1, grad_accum=8))
    same_run(a, b, keys)


def test_bco_running_mean_is_kept_over_all_ranks(tmp_path, tiny_dir):
    keys = ("loss", "grad_norm", "rewards/margins")
    loss = {"name": "bco_pair", "beta": 0.1}
    ddp = torchrun(tmp_path, {**base_config(tmp_path, tiny_dir, PAIRS, "bco-ddp", batch_size=2), "loss": loss}, 2)
    one = in_process({**base_config(tmp_path, tiny_dir, PAIRS, "bco-one", batch_size=4), "loss": loss})
    same_run(one, ddp, keys)


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_example_accelerate_configs_are_valid(name):
    """The GPU configs of docs/distributed.md (not runnable here) parse with accelerate's own loader."""
    from accelerate.commands.config.config_args import ClusterConfig

    repo = Path(__file__).resolve().parents[1]
    cfg = ClusterConfig.from_yaml_file(str(repo / "examples" / "accelerate" / f"{name}.yaml"))
    assert cfg.num_processes == 2 and str(cfg.mixed_precision) == "bf16" and not cfg.use_cpu
    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED"}
    assert str(cfg.distributed_type).endswith(expected[name])
