"""The Python API: docs/python.md runs as written (every `python` block, in order, on the embedded
model), and train() / PreferenceTrainer take what a TRL user hands them — datasets.Dataset, a list
of dicts, a file, model and tokenizer objects — on the tiny model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from test_hub import HUB_ID, _hub_cache  # tests/ is on sys.path (rootdir conftest)
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

import prefopt
from prefopt.evaluation.trained import load_trained
from prefopt.training.trainer import PreferenceTrainer

REPO = Path(__file__).resolve().parents[1]
PAIRS = [
    {"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f" {2 * i}.", "rejected": f" No idea, {i + 1}?"}
    for i in range(6)
]


@pytest.mark.slow
def test_docs_python_page_runs_as_written(smol_dir, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "python.md").read_text(), re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/python.md", "exec"), namespace)
    assert namespace["summary"]["steps"] == 2
    for folder in ("python-demo", "python-objects", "python-trainer/final"):
        assert (tmp_path / "runs" / folder).is_dir(), folder
    _the_embedded_adapter_is_hub_ready(tmp_path / "runs" / "python-demo", smol_dir, tmp_path)


# loads the adapter with plain transformers + peft, the base named only by its hub id
LOAD_BY_HUB_ID = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
model = PeftModel.from_pretrained(base, sys.argv[1]).eval()
with torch.no_grad():
    torch.save(model(torch.tensor([[1, 2, 3, 4, 5]])).logits, sys.argv[2])
"""


def _the_embedded_adapter_is_hub_ready(run: Path, smol_dir: str, tmp_path: Path) -> None:
    """An adapter trained on the embedded model names its base by the public hub id, its card has
    no placeholder, and on a machine where only that hub id resolves (offline, the base in the Hub
    cache under that id: here a copy of the local conversion) plain peft loads it and computes what
    prefopt's own loading does."""
    assert json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID
    card = (run / "README.md").read_text()
    assert f"base_model: {HUB_ID}" in card and "[More Information Needed]" not in card and "TODO" not in card
    home = tmp_path / "hf-home"
    _hub_cache(home, HUB_ID, Path(smol_dir))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    args = [sys.executable, "-c", LOAD_BY_HUB_ID, str(run), str(tmp_path / "logits.pt")]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    trained = load_trained(str(run))
    with torch.no_grad():
        expected = trained.model(torch.tensor([[1, 2, 3, 4, 5]])).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=1e-5)


def config(tmp_path, out):
    return {
        "train": {
            "output_dir": str(tmp_path / out),
            "max_steps": 2,
            "batch_size": 2,
            "progress": False,
            "bf16": False,
            "gradient_checkpointing": False,
        },
        "reference": {"cache_dir": str(tmp_path / "ref")},
    }


@pytest.mark.parametrize("kind", ["dataset", "list", "file"])
def test_train_takes_model_tokenizer_and_data_objects(tiny_dir, tmp_path, kind):
    data = {"dataset": Dataset.from_list(PAIRS), "list": PAIRS, "file": tmp_path / "pairs.jsonl"}[kind]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    data = str(data) if kind == "file" else data
    summary = prefopt.train(config(tmp_path, kind), model=model, tokenizer=tokenizer, train_dataset=data)
    assert summary["steps"] == 2 and summary["train_pairs"] == len(PAIRS)
    saved = (tmp_path / kind / "prefopt.yaml").read_text()
    assert tiny_dir in saved  # the model object's name is recorded


def test_preference_trainer_takes_a_dataset_of_records(tiny_dir, tmp_path):
    """The reported failure: a datasets.Dataset of preference records gave 'No columns in the dataset
    match the model's forward'. Now the trainer reads, tokenizes and trains on it, reference
    log-probs precomputed (policy == reference before the first step: loss ln 2)."""
    args = TrainingArguments(
        output_dir=str(tmp_path / "t"),
        max_steps=2,
        per_device_train_batch_size=2,
        logging_steps=1,
        learning_rate=1e-2,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = PreferenceTrainer(
        tiny_dir,
        args,
        train_dataset=Dataset.from_list(PAIRS),
        loss="sigmoid",
        loss_kwargs={"beta": 0.1},
        max_length=64,
        max_prompt_length=32,
    )
    assert all("ref_logps" in ex for ex in trainer.train_dataset)
    result = trainer.train()
    first = next(h for h in trainer.state.log_history if "loss" in h)
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3) and result.global_step == 2


def test_train_completes_a_config_object_and_leaves_it_unchanged(tiny_dir, tmp_path):
    """A prefopt.Config built in code gets the loss's defaults (β …) and is validated; the caller's
    object is not changed (a second call with it trains the same way)."""
    cfg = prefopt.Config()
    cfg.model.name = tiny_dir
    cfg.data.train = str(tmp_path / "pairs.jsonl")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    cfg.train.output_dir, cfg.train.max_steps, cfg.train.progress = str(tmp_path / "a"), 1, False
    cfg.reference.cache_dir = str(tmp_path / "ref")
    before = cfg.resolved()
    assert prefopt.train(cfg)["steps"] == 1
    assert cfg.resolved() == before and cfg.loss.beta is None
    cfg.train.output_dir = str(tmp_path / "b")
    assert prefopt.train(cfg)["steps"] == 1
