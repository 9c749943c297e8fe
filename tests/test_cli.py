"""`python -m prefopt train`: bad input exits 2 with one paragraph (no traceback unless --debug);
tiny-model runs (full fine-tune and LoRA + merge) save loadable models and per-step metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {
    **os.environ,
    "OMP_WAIT_POLICY": "PASSIVE",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}

PAIRS = [
    {
        "prompt": f"Question {i}: what is {i} plus {i}?",
        "chosen": f" {2 * i}.",
        "rejected": f" I do not know, maybe {i + 1} or so.",
    }
    for i in range(8)
]

METRICS = [
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
]


def start(args, cwd):
    return subprocess.Popen(
        [sys.executable, "-m", "prefopt", *args],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_dir):
    """A folder with a good config (tiny model, 8 pairs), and the bad inputs the error cases use."""
    d = tmp_path_factory.mktemp("cli")
    (d / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    (d / "missing-field.jsonl").write_text(
        json.dumps(PAIRS[0]) + "\n" + json.dumps({"prompt": "a", "chosen": " b"}) + "\n"
    )
    (d / "empty.jsonl").write_text("")
    (d / "not-a-model").mkdir()
    (d / "cfg.yaml").write_text(
        f"model:\n  name: {tiny_dir}\n"
        f"data:\n  train: {d / 'pairs.jsonl'}\n  max_length: 64\n  max_prompt_length: 32\n"
        f"reference:\n  cache_dir: {d / 'ref-cache'}\n"
        f"train:\n  max_steps: 2\n  batch_size: 2\n  output_dir: {d / 'out'}\n  progress: false\n"
        f"  lr: 1.0e-3\n  warmup_ratio: 0.0\n"
    )
    return d


ERROR_CASES = {
    # name: (extra args, fragments the one-paragraph message must contain)
    "unknown-key": (
        ["--train.learnig_rate", "1e-5"],
        ["'train.learnig_rate'", "cfg.yaml", "did you mean 'learning_rate'"],
    ),
    "missing-data": (["--data.train", "{d}/nope.jsonl"], ["{d}/nope.jsonl", "no such file"]),
    "missing-model": (["--model.name", "{d}/no-such-model"], ["model.name", "{d}/no-such-model", "does not exist"]),
    "missing-field": (["--data.train", "{d}/missing-field.jsonl"], ["{d}/missing-field.jsonl line 2", "'rejected'"]),
    "empty-data": (["--data.train", "{d}/empty.jsonl"], ["{d}/empty.jsonl", "empty"]),
}


def run_cli(work, args):
    # one process at a time: on a 2-core machine parallel interpreter start-ups are slower than serial
    return finish(start(["train", str(work / "cfg.yaml"), *[a.format(d=work) for a in args]], work))


def check_error_message(err: str, fragments, work):
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("prefopt: error:")]
    assert len(lines) == 1, err
    message = err[err.index("prefopt: error:") :].strip()
    assert "\n\n" not in message, message  # one paragraph
    for frag in fragments:
        assert frag.format(d=work) in message, (frag, message)


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_exits_2_with_one_paragraph(work, case):
    args, fragments = ERROR_CASES[case]
    rc, out, err = run_cli(work, args)
    assert rc == 2, (rc, err[-3000:])
    assert "Traceback" not in out
    check_error_message(err, fragments, work)


def test_debug_shows_traceback(work):
    rc, out, err = run_cli(work, ["--debug", "--train.learnig_rate", "1e-5"])
    assert rc not in (0, 2)
    assert "Traceback" in err and "PrefoptError" in err and "'train.learnig_rate'" in err
    rc, out, err = run_cli(work, ["--train.learnig_rate", "1e-5", "--debug"])  # anywhere on the line
    assert "Traceback" in err and "PrefoptError" in err


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["--model.name", "{d}/not-a-model"], ["model.name", "{d}/not-a-model", "config.json"]),
        (
            [
                "--data.train",
                "{d}/pairs.jsonl",
                "--data.max_length",
                "16",
                "--data.max_prompt_length",
                "8",
                "--data.truncation",
                "drop",
            ],
            ["{d}/pairs.jsonl", "no pair is left", "8 dropped"],
        ),
        (["--loss.beta", "-1"], ["'loss.beta'"]),
        (["--train.batch_size", "two"], ["'train.batch_size'"]),
    ],
)
def test_more_bad_input_in_process(work, capsys, args, fragments):
    """The same entry point `python -m prefopt` calls (prefopt.cli.main), in this process."""
    from prefopt.cli import main

    rc = main(["train", str(work / "cfg.yaml"), *[a.format(d=work) for a in args]])
    assert rc == 2
    check_error_message(capsys.readouterr().err, fragments, work)


def read_metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r]


def check_metrics(out: Path, steps: int):
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        for key in METRICS:
            assert key in r and isinstance(r[key], float), (key, r)
        assert r["logps/chosen"] < 0 and r["logps/rejected"] < 0
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-5)
        assert 0.0 <= r["rewards/accuracies"] <= 1.0
    # the policy starts as the reference: zero rewards and loss log 2 at step 1
    assert rows[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-4)
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-4)
    # after one update with lr 1e-3 the policy has moved
    assert rows[-1]["rewards/chosen"] != 0.0 or rows[-1]["rewards/rejected"] != 0.0
    return rows


def test_full_finetune_run(work):
    out = work / "out-full"
    rc, stdout, err = finish(start(["train", str(work / "cfg.yaml"), "--train.output_dir", str(out)], work))
    assert rc == 0, err[-4000:]
    assert "trained 2 steps" in stdout
    assert (out / "model.safetensors").is_file()
    assert (out / "prefopt.yaml").is_file()
    assert not (out / "adapter_config.json").exists()
    check_metrics(out, 2)

    import yaml

    saved = yaml.safe_load((out / "prefopt.yaml").read_text())
    assert saved["train"]["max_steps"] == 2 and saved["train"]["output_dir"] == str(out)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.hidden_size == 32
    assert AutoTokenizer.from_pretrained(out).eos_token == "<|im_end|>"


def test_lora_merge_run(work, tiny_dir):
    out = work / "out-lora"
    rc, stdout, err = finish(
        start(
            [
                "train",
                str(work / "cfg.yaml"),
                "--train.output_dir",
                str(out),
                "--lora.enabled",
                "true",
                "--lora.merge",
                "true",
                "--lora.r",
                "4",
            ],
            work,
        )
    )
    assert rc == 0, err[-4000:]
    assert (out / "adapter_config.json").is_file()
    assert (out / "prefopt.yaml").is_file()
    assert (out / "merged" / "model.safetensors").is_file()
    check_metrics(out, 2)

    import torch
    from transformers import AutoModelForCausalLM

    adapted = AutoModelForCausalLM.from_pretrained(out)  # base model + adapter, through peft
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    ids = torch.tensor([[100, 200, 300, 400, 500]])
    with torch.no_grad():
        la, lm, lb = (m.eval()(ids).logits for m in (adapted, merged, base))
    torch.testing.assert_close(la, lm, atol=1e-4, rtol=1e-4)  # merged == base + adapter
    assert (la - lb).abs().max() > 0  # and the adapter was trained


def test_prefopt_config_prints_every_key_with_its_default(capsys):
    """`prefopt config`: every key of every section, its default and a meaning, as YAML that loads
    back to the defaults; one section on request; an unknown section is a clear error."""
    import dataclasses

    import yaml

    from prefopt import config
    from prefopt.cli import main

    assert main(["config"]) == 0
    text = capsys.readouterr().out
    loaded = yaml.safe_load(text)
    assert loaded == config.Config().resolved()
    defaults = config.Config()
    for section in config.SECTIONS:
        for field in dataclasses.fields(getattr(defaults, section)):
            line = next(line for line in text.splitlines() if line.startswith(f"  {field.name}:"))
            assert "  # " in line, line  # its meaning
    assert main(["config", "lora"]) == 0
    assert set(yaml.safe_load(capsys.readouterr().out)) == {"lora"}
    assert main(["config", "trian"]) == 2
    assert "did you mean 'train'" in capsys.readouterr().err
