"""A TRL user's first hour, through the command line on the tiny model: the common public data
shapes train 2 steps each with at most a data.fields line, and evaluation reads the evaluation
split — checked by content (the eval responses have a length no training response has), not by a
count."""

from __future__ import annotations

import bz2
import csv
import gzip
import json
from pathlib import Path

import pytest
import yaml
from datasets import Dataset, DatasetDict

from prefopt.cli import main

TRAIN_ANSWER = " It is {n}."  # training responses: short
EVAL_ANSWER = " The answer, after careful thought about every part of the question, is {n} exactly."  # long


def ultrafeedback(i: int, answer: str) -> dict:
    prompt = f"What is {i} plus {i}?"
    turn = {"role": "user", "content": prompt}
    return {
        "prompt": prompt,
        "prompt_id": f"id{i}",
        "chosen": [turn, {"role": "assistant", "content": answer.format(n=2 * i)}],
        "rejected": [turn, {"role": "assistant", "content": answer.format(n=2 * i + 1)}],
        "messages": [turn, {"role": "assistant", "content": answer.format(n=2 * i)}],
        "score_chosen": 8.0,
        "score_rejected": 4.0,
    }


def records(n=4, answer=TRAIN_ANSWER, start=0):
    return [ultrafeedback(start + i, answer) for i in range(n)]


def standard(n=4):
    return [
        {"prompt": f"What is {i} plus {i}?", "chosen": f" {2 * i}.", "rejected": f" {2 * i + 1}."} for i in range(n)
    ]


def write_jsonl(path: Path, rows, opener=open) -> str:
    with opener(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def write_sheet(path: Path, rows, delimiter: str) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(["Prompt", "Chosen", "Rejected"])  # a spreadsheet's capitalised headers
        writer.writerows([r["prompt"], r["chosen"], r["rejected"]] for r in rows)
    return str(path)


def make_source(kind: str, tmp: Path) -> tuple[dict, bool]:
    """(the data section, whether it has an eval split)."""
    if kind == "ultrafeedback-jsonl":
        return {"train": write_jsonl(tmp / "ufb.jsonl", records())}, False
    if kind == "ultrafeedback-parquet":
        Dataset.from_list(records()).to_parquet(str(tmp / "ufb.parquet"))
        return {"train": str(tmp / "ufb.parquet")}, False
    if kind == "ultrafeedback-datasetdict":
        DatasetDict(
            {
                "train_prefs": Dataset.from_list(records()),
                "test_prefs": Dataset.from_list(records(2, EVAL_ANSWER, start=10)),
            }
        ).save_to_disk(str(tmp / "ufb"))
        return {"train": f"{tmp / 'ufb'}:train_prefs", "eval": str(tmp / "ufb")}, True
    if kind == "csv-capitalised":
        fields = {"Prompt": "prompt", "Chosen": "chosen", "Rejected": "rejected"}
        return {"train": write_sheet(tmp / "sheet.csv", standard(), ","), "fields": fields}, False
    if kind == "tsv":
        fields = {"Prompt": "prompt", "Chosen": "chosen", "Rejected": "rejected"}
        return {"train": write_sheet(tmp / "sheet.tsv", standard(), "\t"), "fields": fields}, False
    if kind == "jsonl-gz":
        return {"train": write_jsonl(tmp / "pairs.jsonl.gz", standard(), gzip.open)}, False
    if kind == "jsonl-bz2":
        return {"train": write_jsonl(tmp / "pairs.jsonl.bz2", standard(), bz2.open)}, False
    raise AssertionError(kind)


KINDS = [
    "ultrafeedback-jsonl",
    "ultrafeedback-parquet",
    "ultrafeedback-datasetdict",
    "csv-capitalised",
    "tsv",
    "jsonl-gz",
    "jsonl-bz2",
]


@pytest.mark.parametrize("kind", KINDS)
def test_public_shapes_train_through_the_cli(kind, tiny_dir, tmp_path):
    data, has_eval = make_source(kind, tmp_path)
    inputs = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    cfg = {
        "model": {"name": tiny_dir},
        "data": {**data, "max_length": 96, "max_prompt_length": 48},
        "reference": {"cache_dir": str(tmp_path / "cache")},
        "train": {
            "output_dir": str(tmp_path / "out"),
            "max_steps": 2,
            "batch_size": 2,
            "progress": False,
            "bf16": False,
            "gradient_checkpointing": False,
        },
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 2
    assert {p: p.read_bytes() for p in inputs} == inputs  # the user's data untouched, nothing beside it
    assert not [
        p
        for p in (tmp_path).iterdir()
        if p.name not in {"out", "cache", "cfg.yaml"} and p not in inputs and not any(q in inputs for q in p.rglob("*"))
    ]
    if has_eval:
        evals = [r for r in rows if "eval_lengths/chosen" in r]
        train_lengths = {r["lengths/chosen"] for r in rows if "lengths/chosen" in r}
        # the evaluation ran on test_prefs: its chosen responses are the long ones
        assert evals and evals[-1]["eval_lengths/chosen"] > 2 * max(train_lengths)


def test_trl_names_and_passthrough_on_the_command_line(tiny_dir, tmp_path):
    """The issue's command: TRL / TrainingArguments names, an optimizer and a peft option."""
    data, _ = make_source("jsonl-gz", tmp_path)
    cfg = {
        "model": {"name": tiny_dir},
        "lora": {"enabled": True, "r": 4},
        "data": {**data, "max_length": 64, "max_prompt_length": 32},
        "reference": {"cache_dir": str(tmp_path / "cache")},
        "train": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "progress": False, "bf16": False},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    argv = [
        "train",
        str(tmp_path / "cfg.yaml"),
        "--train.learning_rate",
        "1e-5",
        "--train.per_device_train_batch_size",
        "2",
        "--train.optim",
        "adamw_torch",
        "--lora.use_dora",
        "true",
    ]
    assert main(argv) == 0
    saved = yaml.safe_load((tmp_path / "out" / "prefopt.yaml").read_text())
    assert saved["train"]["lr"] == 1e-5 and saved["train"]["batch_size"] == 2
    adapter = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert adapter["use_dora"] is True
    args = json.loads((tmp_path / "out" / "training_args.json").read_text())
    assert args["optim"] == "adamw_torch" and args["learning_rate"] == 1e-5
    # the resolved config beside the model trains again as it is
    assert main(["train", str(tmp_path / "out" / "prefopt.yaml"), "--train.output_dir", str(tmp_path / "again")]) == 0
