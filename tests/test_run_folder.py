"""A run never loses or corrupts work: non-finite checkpoints are never published, a run owns its
output folder (lock, another run's outputs, --overwrite), --resume refuses another config or other
data (--force records it), and output_dir is never the model folder it reads. Real training on
the tiny model, real processes for the lock."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from prefopt import config
from prefopt.errors import PrefoptError
from prefopt.recipes.train import train
from prefopt.training import checkpoints, run_folder
from prefopt.training.trainer import PreferenceTrainer

PAIRS = [
    {"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f" {2 * i}.", "rejected": f" No idea, {i + 1}?"}
    for i in range(8)
]


def write_pairs(path: Path, pairs=PAIRS) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


def make_cfg(tiny_dir, tmp_path, out="out", data=None, **train_kw):
    data = data or write_pairs(tmp_path / "pairs.jsonl")
    train_keys = {
        "output_dir": str(tmp_path / out),
        "max_steps": 4,
        "batch_size": 2,
        "lr": 1e-2,
        "warmup_ratio": 0.0,
        "progress": False,
        "bf16": False,
        "gradient_checkpointing": False,
        "seed": 0,
        "save_steps": 2,
        "save_total_limit": 0,
        **train_kw,
    }
    return config.from_dict(
        {
            "model": {"name": tiny_dir},
            "data": {"train": str(data), "max_length": 64, "max_prompt_length": 32},
            "reference": {"cache_dir": str(tmp_path / "ref")},
            "train": train_keys,
        }
    )


def all_finite(folder: Path) -> bool:
    weights = load_file(str(folder / "model.safetensors"))
    return all(bool(t.isfinite().all()) for t in weights.values())


# ---- 1. a non-finite state is never published, and never called the last good checkpoint ----


def test_nonfinite_weights_at_a_save_step_are_not_published(tiny_dir, tmp_path):
    """lr 1e30 without clipping: the first update makes the weights non-finite while the logged
    loss (computed before it) is still finite, and every step is a save step. Before the fix the
    step's checkpoint held the non-finite weights and was named 'the last good checkpoint'."""
    cfg = make_cfg(tiny_dir, tmp_path, lr=1e30, max_grad_norm=0.0, save_steps=1, max_steps=6)
    with pytest.raises(PrefoptError, match="not finite") as info:
        train(cfg)
    out = Path(cfg.train.output_dir)
    published = checkpoints.complete(out)
    assert all(all_finite(c) for c in published)
    assert not (out / "model.safetensors").exists()
    last_good = checkpoints.last_good(out)
    if last_good is None:
        assert "no checkpoint was saved" in str(info.value)
    else:
        assert str(last_good) in str(info.value) and all_finite(last_good)


def test_state_is_finite_checks_weights_and_optimizer_moments(tiny_dir, tmp_path):
    """The check itself: one NaN in a weight, or in an Adam moment, is seen."""
    cfg = make_cfg(tiny_dir, tmp_path, max_steps=1, save_steps=0)
    seen = {}
    real = PreferenceTrainer.state_is_finite

    def probe(self):
        seen["clean"] = real(self)
        moment = next(iter(self.optimizer.state.values()))["exp_avg"]
        moment.view(-1)[0] = math.nan
        seen["moment"] = real(self)
        moment.view(-1)[0] = 0.0
        weight = next(p for p in self.model.parameters() if p.requires_grad)
        keep = weight.data.view(-1)[0].item()
        weight.data.view(-1)[0] = math.inf
        seen["weight"] = real(self)
        weight.data.view(-1)[0] = keep
        return True

    cfg.train.save_steps = 1
    PreferenceTrainer.state_is_finite = probe
    try:
        train(cfg)
    finally:
        PreferenceTrainer.state_is_finite = real
    assert seen == {"clean": True, "moment": False, "weight": False}


def test_quantized_optimizer_moments_are_checked_and_resumed(tiny_dir, tmp_path):
    """An optimizer whose moments are quantized tensors (torchao's 8-bit AdamW, transformers'
    `optim: adamw_torch_8bit`, the memory lever docs/benchmarks.md measures) passes the finite check
    on their values, publishes its checkpoints and resumes from them. Runs where torchao is installed
    (it is not a test dependency: once installed, transformers imports it in every process that loads
    a model, with warnings on stderr)."""
    pytest.importorskip("torchao")
    cfg = make_cfg(tiny_dir, tmp_path, max_steps=2, save_steps=1, args={"optim": "adamw_torch_8bit"})
    train(cfg)
    out = Path(cfg.train.output_dir)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert json.loads((out / "checkpoint-2" / checkpoints.RUN_FILE).read_text())["finite"] is True
    shutil.rmtree(out / "checkpoint-2")  # as if killed after step 1's checkpoint
    train(cfg, resume=True)  # loads checkpoint-1's quantized moments, trains step 2 again
    assert json.loads((out / "checkpoint-2" / checkpoints.RUN_FILE).read_text())["finite"] is True


# ---- 2 and 5. a run owns its folder ----


def test_a_folder_holding_another_run_is_refused_unless_resume_or_overwrite(tiny_dir, tmp_path):
    first = make_cfg(tiny_dir, tmp_path, out="over")
    train(first)
    out = Path(first.train.output_dir)
    second = make_cfg(tiny_dir, tmp_path, out="over", lr=5e-3)
    with pytest.raises(PrefoptError, match="holds another run's outputs.*--resume.*--overwrite"):
        train(second)
    # --overwrite removes the old run first: every checkpoint left is the new run's
    train(second, overwrite=True)
    for c in checkpoints.complete(out):
        saved = json.loads((c / checkpoints.RUN_FILE).read_text())
        assert saved["config"]["train"]["lr"] == 5e-3
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1


def test_a_second_run_into_a_locked_folder_is_refused_and_the_lock_dies_with_its_holder(tiny_dir, tmp_path):
    cfg = make_cfg(tiny_dir, tmp_path, out="busy")
    out = Path(cfg.train.output_dir)
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from prefopt.training import run_folder; "
            "run_folder.lock(Path(sys.argv[1])); print('locked', flush=True); sys.stdin.read()",
            str(out),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(PrefoptError, match=f"in use by another prefopt run \\(pid {holder.pid}\\)"):
            train(cfg)
        assert not (out / "metrics.jsonl").exists()  # nothing written by the refused run
    finally:
        holder.kill()  # SIGKILL: the OS releases the lock
        holder.wait(30)
    train(cfg)
    assert (out / "model.safetensors").is_file()


# ---- 4. --resume continues only the same run ----


@pytest.fixture()
def finished(tiny_dir, tmp_path):
    """A 4-step run with checkpoints 2 and 4 (its model removed, so resuming would continue it)."""
    cfg = make_cfg(tiny_dir, tmp_path, out="run")
    train(cfg)
    return cfg


@pytest.mark.parametrize("key, value", [("lr", 5e-4), ("max_steps", 6)])
def test_resume_with_another_setting_is_refused(finished, tiny_dir, tmp_path, key, value):
    cfg = make_cfg(tiny_dir, tmp_path, out="run", **{key: value})
    before = sorted(p.name for p in Path(cfg.train.output_dir).iterdir())
    with pytest.raises(PrefoptError, match=f"train.{key}: .* -> {value}.*--force"):
        train(cfg, resume=True)
    assert sorted(p.name for p in Path(cfg.train.output_dir).iterdir()) == before


def test_resume_with_other_data_is_refused_at_the_same_path_and_at_a_new_one(finished, tiny_dir, tmp_path):
    changed = [dict(p, chosen=p["chosen"] + " Sure.") for p in PAIRS]
    write_pairs(tmp_path / "pairs.jsonl", changed)  # same path, new content
    with pytest.raises(PrefoptError, match="training data"):
        train(make_cfg(tiny_dir, tmp_path, out="run", data=tmp_path / "pairs.jsonl"), resume=True)
    moved = write_pairs(tmp_path / "other.jsonl", changed)
    with pytest.raises(PrefoptError, match="training data"):
        train(make_cfg(tiny_dir, tmp_path, out="run", data=moved), resume=True)


def test_resume_of_moved_but_identical_data_and_of_a_new_logging_setting_is_allowed(finished, tiny_dir, tmp_path):
    moved = shutil.copy(tmp_path / "pairs.jsonl", tmp_path / "moved.jsonl")
    cfg = make_cfg(tiny_dir, tmp_path, out="run", data=moved, logging_steps=2)
    summary = train(cfg, resume=True)
    assert summary["resumed_from"].endswith("checkpoint-4")


def test_resume_force_proceeds_and_records_what_differed(finished, tiny_dir, tmp_path):
    out = Path(finished.train.output_dir)
    shutil.rmtree(out / "checkpoint-4")
    (out / "model.safetensors").unlink()
    cfg = make_cfg(tiny_dir, tmp_path, out="run", lr=5e-4)
    summary = train(cfg, resume=True, force=True)
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["steps"] == 4
    record = json.loads((out / run_folder.RESUMES_FILE).read_text().splitlines()[-1])
    assert record["checkpoint"] == "checkpoint-2" and any("train.lr" in d for d in record["differences"])


def test_resume_of_a_finished_run_without_checkpoints_is_refused(tiny_dir, tmp_path):
    cfg = make_cfg(tiny_dir, tmp_path, out="nockpt", save_steps=0)
    train(cfg)
    with pytest.raises(PrefoptError, match="no complete checkpoint to continue from.*--overwrite"):
        train(cfg, resume=True)


# ---- 6. outputs never overwrite inputs ----


def test_output_dir_equal_to_the_model_folder_is_refused(tiny_dir, tmp_path):
    model = Path(shutil.copytree(tiny_dir, tmp_path / "model"))
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    cfg = make_cfg(str(model), tmp_path)
    cfg.train.output_dir = str(model) + "/"
    with pytest.raises(PrefoptError, match="model folder"):
        train(cfg)
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


@pytest.mark.parametrize("case", ["file", "under-a-file"])
def test_output_dir_that_is_not_a_folder_is_refused(tiny_dir, tmp_path, case):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    cfg = make_cfg(tiny_dir, tmp_path)
    cfg.train.output_dir = str(blocker if case == "file" else blocker / "out")
    with pytest.raises(PrefoptError, match="output_dir.*file"):
        train(cfg)
    assert blocker.read_text() == "keep me"


def test_overwrite_never_removes_what_the_run_reads(tiny_dir, tmp_path):
    """--overwrite removes the earlier run's outputs, but not a model (or data) inside them that this
    run trains from: e.g. model.name: OUT/checkpoint-2 with output_dir OUT."""
    first = make_cfg(tiny_dir, tmp_path, out="run")
    train(first)
    out = Path(first.train.output_dir)
    second = make_cfg(str(out / "checkpoint-2"), tmp_path, out="run")
    with pytest.raises(PrefoptError, match="--overwrite would remove .*checkpoint-2, which this run reads"):
        train(second, overwrite=True)
    assert (out / "checkpoint-2" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "flags, fragment",
    [(dict(resume=True, overwrite=True), "give one"), (dict(force=True), "--force goes with --resume")],
)
def test_contradictory_flags_are_refused(tiny_dir, tmp_path, flags, fragment):
    with pytest.raises(PrefoptError, match=fragment):
        train(make_cfg(tiny_dir, tmp_path), **flags)
