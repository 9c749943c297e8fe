"""Bad model folders, reference caches and eval/score arguments: each gives a PrefoptError (exit
code 2 on the command line) that names the file or the argument; an evaluated folder never runs its
own code; `prefopt score` never writes over its inputs."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from prefopt.cli import main
from prefopt.config import LoraConfig
from prefopt.data.collate import Collator
from prefopt.errors import PrefoptError
from prefopt.modeling import load, reference

PAIRS = [
    {"prompt": f"Q{i}: what is {i} plus {i}?", "chosen": f" {2 * i}.", "rejected": f" maybe {i + 1}."} for i in range(4)
]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def model_copy(tmp_path, tiny_dir) -> Path:
    return Path(shutil.copytree(tiny_dir, tmp_path / "model"))


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    path = tmp_path / "data" / "pairs.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return path


def make_run(folder: Path, tiny_dir: str, pairs_file: Path, trust_in_yaml: bool = False) -> Path:
    """A finished-looking full fine-tune run folder: the tiny model's files and a prefopt.yaml."""
    shutil.copytree(tiny_dir, folder)
    raw = {
        "model": {"name": str(tiny_dir), "trust_remote_code": trust_in_yaml},
        "data": {"train": str(pairs_file), "max_length": 64, "max_prompt_length": 32},
        "train": {"output_dir": str(folder), "bf16": False, "progress": False},
    }
    (folder / "prefopt.yaml").write_text(yaml.safe_dump(raw))
    return folder


@pytest.fixture
def run_folder(tmp_path, tiny_dir, pairs_file) -> Path:
    return make_run(tmp_path / "run", tiny_dir, pairs_file)


# -- model folders -----------------------------------------------------------------------------------

CORRUPTIONS = {
    "truncated": lambda b: b[: len(b) // 2],
    "random-bytes": lambda b: random.Random(0).randbytes(4096),
    "empty": lambda b: b"",
    "huge-header": lambda b: (2**60).to_bytes(8, "little") + b[8:],
    "header-not-json": lambda b: (20).to_bytes(8, "little") + b"\xff" * 20 + b[28:],
    "trailing-bytes": lambda b: b + b"\0" * 16,
    "git-lfs-pointer": lambda b: b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 123\n",
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_weights_name_the_file(model_copy, kind):
    weights = model_copy / "model.safetensors"
    weights.write_bytes(CORRUPTIONS[kind](weights.read_bytes()))
    with pytest.raises(PrefoptError) as e:
        load.load_model(str(model_copy))
    assert str(weights) in str(e.value) and "\n" not in str(e.value)


def test_safetensors_problem_accepts_a_good_file(tiny_dir, tmp_path):
    assert load.safetensors_problem(Path(tiny_dir) / "model.safetensors") is None
    small = tmp_path / "small.safetensors"
    save_file({"x": torch.zeros(3, 2)}, str(small), metadata={"k": "v"})
    assert load.safetensors_problem(small) is None


def test_corrupt_tokenizer_names_the_folder(model_copy):
    (model_copy / "tokenizer.json").write_bytes(b"garbage{\x00 not json")
    with pytest.raises(PrefoptError, match="tokenizer") as e:
        load.load_tokenizer(str(model_copy))
    assert str(model_copy) in str(e.value) and "\n" not in str(e.value)


def test_missing_tokenizer_names_the_folder(model_copy):
    for f in list(model_copy.glob("tokenizer*")) + list(model_copy.glob("special_tokens_map.json")):
        f.unlink()
    with pytest.raises(PrefoptError, match="tokenizer") as e:
        load.load_tokenizer(str(model_copy))
    assert str(model_copy) in str(e.value)


def test_fake_gguf_names_the_file(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(random.Random(1).randbytes(4096))
    with pytest.raises(PrefoptError, match="not a GGUF file") as e:
        load.resolve(str(fake))
    assert str(fake) in str(e.value)


def test_truncated_gguf_names_the_file(tmp_path, monkeypatch):
    fake = tmp_path / "cut.gguf"
    fake.write_bytes(b"GGUF" + random.Random(2).randbytes(64))
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(PrefoptError) as e:
        load.resolve(str(fake))
    assert str(fake) in str(e.value) and "\n" not in str(e.value)


def test_model_name_that_is_a_regular_file(pairs_file):
    with pytest.raises(PrefoptError, match="is a file, not a model folder") as e:
        load.resolve(str(pairs_file))
    assert "does not exist" not in str(e.value)


def test_unknown_attn_implementation_is_named(tiny_dir):
    with pytest.raises(PrefoptError, match="model.attn_implementation: 'bogus'"):
        load.load_model(tiny_dir, attn_implementation="bogus")


def test_lora_target_modules_matching_nothing(tiny_dir):
    model = load.load_model(tiny_dir)
    with pytest.raises(PrefoptError, match="lora.target_modules") as e:
        load.add_lora(model, LoraConfig(enabled=True, r=4, target_modules=["nope_proj"]))
    assert "nope_proj" in str(e.value) and "q_proj" in str(e.value) and "lm_head" not in str(e.value)


# -- reference cache ---------------------------------------------------------------------------------


def make_examples(n: int = 5, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def ids(k):
        return [rng.randrange(3, 49152) for _ in range(k)]

    return [{"prompt_ids": ids(rng.randint(1, 9)), "chosen_ids": ids(4), "rejected_ids": ids(5)} for _ in range(n)]


@pytest.fixture(scope="module")
def base_model(tiny_dir):
    return load.load_model(tiny_dir).eval()


def precompute(model, examples, cache):
    reference.precompute(
        model, examples, Collator(2), cache_dir=cache, batch_size=4, chunk=0, autocast_dtype=None, progress=False
    )
    return torch.tensor([ex["ref_logps"] for ex in examples], dtype=torch.float64)


def cache_corruptions(good: Path) -> dict:
    data = good.read_bytes()
    values = load_file(str(good))["ref_logps"]
    flipped = values.clone()
    flipped[0, 0] += 1.0
    return {
        "garbage": lambda p: p.write_bytes(b"garbage, not safetensors\n" * 4),
        "truncated": lambda p: p.write_bytes(data[: len(data) - 7]),
        "empty": lambda p: p.write_bytes(b""),
        "wrong-shape": lambda p: save_file({"ref_logps": values[:2].contiguous()}, str(p)),
        "wrong-name": lambda p: save_file({"other": values}, str(p)),
        "checksum": lambda p: save_file({"ref_logps": flipped}, str(p), metadata={reference.CHECKSUM_KEY: "0" * 32}),
    }


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty", "wrong-shape", "wrong-name", "checksum"])
def test_corrupt_cache_is_named_recomputed_and_rewritten(base_model, tmp_path, caplog, kind):
    cache = tmp_path / "cache"
    examples = make_examples()
    expected = precompute(base_model, copy.deepcopy(examples), cache)
    (path,) = cache.glob("*.safetensors")
    cache_corruptions(path)[kind](path)
    with caplog.at_level(logging.WARNING, logger="prefopt"):
        got = precompute(base_model, copy.deepcopy(examples), cache)
    assert torch.equal(got, expected)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"reference cache {path} is unreadable" in w and "recomputing" in w for w in warnings), warnings
    assert torch.equal(load_file(str(path))["ref_logps"], expected)  # rewritten, valid
    assert reference._read_cache(path, ("ref_logps",), len(examples), 2) is not None


def test_cache_file_has_a_checksum(base_model, tmp_path):
    precompute(base_model, make_examples(), tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()[reference.CHECKSUM_KEY] == reference._checksum({"ref_logps": f.get_tensor("ref_logps")})


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_orphan_temp_files_of_dead_writers_are_removed(base_model, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    key = "0123456789abcdef" * 2
    orphan = cache / f"{key}.{dead_pid()}.tmp"
    alive = cache / f"{key}.{os.getpid()}.tmp"  # a writer still running: kept
    unrelated = cache / "notes.123.tmp"  # not a name prefopt writes: kept
    for f in (orphan, alive, unrelated):
        f.write_bytes(b"partial")
    precompute(base_model, make_examples(), cache)
    assert not orphan.exists() and alive.exists() and unrelated.exists()
    assert not list(cache.glob(".write-test*"))


def test_cache_dir_that_is_a_file(base_model, tmp_path):
    taken = tmp_path / "cache.txt"
    taken.write_text("not a folder\n")
    with pytest.raises(PrefoptError, match=r"reference\.cache_dir: .*is a file"):
        precompute(base_model, make_examples(), taken)
    assert taken.read_text() == "not a folder\n"
    with pytest.raises(PrefoptError, match=r"reference\.cache_dir: cannot write"):
        precompute(base_model, make_examples(), taken / "sub")


def test_cache_dir_that_is_read_only(base_model, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    computed = []
    monkeypatch.setattr(reference, "compute_all", lambda *a, **k: computed.append(1))
    real = Path.write_bytes

    def refuse(self, data):
        if self.parent == ro:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", refuse)
    with pytest.raises(PrefoptError, match=r"reference\.cache_dir: cannot write into .*Permission denied"):
        precompute(base_model, make_examples(), ro)
    assert not computed  # checked before computing


# -- eval and score: trust, outputs, arguments ----------------------------------------------------------

EVIL = """from pathlib import Path

Path({marker!r}).write_text("the folder's code ran")

from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    model_type = "evil_llama"


class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
"""


def make_evil_run(tmp_path, tiny_dir, pairs_file, model_type: str) -> tuple[Path, Path]:
    """A run folder whose prefopt.yaml says trust_remote_code: true and whose config.json maps the
    model to evil.py, which writes a marker file when imported."""
    run = make_run(tmp_path / f"run-{model_type}", tiny_dir, pairs_file, trust_in_yaml=True)
    marker = tmp_path / f"marker-{model_type}"
    (run / "evil.py").write_text(EVIL.format(marker=str(marker)))
    config = json.loads((run / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (run / "config.json").write_text(json.dumps(config))
    return run, marker


@pytest.mark.parametrize("model_type", ["llama", "evil_llama"])
@pytest.mark.parametrize("command", ["eval", "score"])
def test_an_evaluated_folder_never_decides_to_run_its_code(
    tmp_path, tiny_dir, pairs_file, capsys, caplog, command, model_type
):
    run, marker = make_evil_run(tmp_path, tiny_dir, pairs_file, model_type)
    argv = [command, "--model", str(run), "--data", str(pairs_file)]
    rc = main(argv + (["--out", str(tmp_path / "scores.jsonl")] if command == "score" else []))
    err = capsys.readouterr().err
    assert not marker.exists(), "the folder's own code ran"
    if model_type == "llama":  # transformers' own Llama class loads it: the folder's code is not needed
        assert rc == 0, err
    else:  # only the folder's code can load it: a clear refusal that says whose decision it is
        assert rc == 2 and "--trust-remote-code" in err and "Traceback" not in err, err
    assert any("trust_remote_code: true" in r.getMessage() for r in caplog.records)  # the ignored setting is said


def test_trust_remote_code_is_the_callers_decision(tmp_path, tiny_dir, pairs_file, monkeypatch):
    from transformers import dynamic_module_utils

    from prefopt.evaluation.trained import load_trained

    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # not ~/.cache
    run, marker = make_evil_run(tmp_path, tiny_dir, pairs_file, "evil_llama")
    with pytest.raises(PrefoptError, match="--trust-remote-code"):
        load_trained(str(run))
    assert not marker.exists()
    trained = load_trained(str(run), trust_remote_code=True)  # the caller decided: the code runs
    assert marker.exists() and type(trained.model).__name__ == "EvilModel" and trained.trust_remote_code


def test_score_out_is_the_data_file(run_folder, pairs_file, capsys):
    before = digest(pairs_file)
    for out in (pairs_file, pairs_file.parent / ".." / "data" / "pairs.jsonl"):
        assert main(["score", "--model", str(run_folder), "--data", str(pairs_file), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "pairs.jsonl" in err and "--data" in err and "Traceback" not in err
    assert digest(pairs_file) == before


def test_score_out_is_a_link_to_the_data_file(run_folder, pairs_file, tmp_path, capsys):
    link = tmp_path / "link.jsonl"
    link.symlink_to(pairs_file)
    before = digest(pairs_file)
    assert main(["score", "--model", str(run_folder), "--data", str(pairs_file), "--out", str(link)]) == 2
    assert "--data" in capsys.readouterr().err and digest(pairs_file) == before


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "prefopt.yaml"])
def test_score_out_is_a_file_of_the_model_folder(run_folder, pairs_file, capsys, name):
    target = run_folder / name
    before = digest(target)
    assert main(["score", "--model", str(run_folder), "--data", str(pairs_file), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert str(target) in err and "model folder" in err and "Traceback" not in err
    assert digest(target) == before


def test_score_out_is_a_file_of_the_base_model(run_folder, pairs_file, tiny_dir, capsys):
    target = Path(tiny_dir) / "generation_config.json"
    before = digest(target)
    assert main(["score", "--model", str(run_folder), "--data", str(pairs_file), "--out", str(target)]) == 2
    assert str(target) in capsys.readouterr().err and digest(target) == before


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--samples", "0"], "--samples"),
        (["--samples", "-2"], "--samples"),
        (["--max-new-tokens", "-1"], "--max-new-tokens"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--seed", "-1"], "--seed"),
    ],
)
def test_eval_prompts_arguments(run_folder, tmp_path, capsys, flags, named):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The movie was\n")
    assert main(["eval", "--model", str(run_folder), "--prompts", str(prompts), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prefopt: error: {named}: ") and flags[1] in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["eval", "score"])
def test_batch_size_below_one(run_folder, pairs_file, capsys, command):
    assert main([command, "--model", str(run_folder), "--data", str(pairs_file), "--batch-size", "0"]) == 2
    assert "--batch-size: must be at least 1, found 0" in capsys.readouterr().err
