"""prefopt.config: YAML + dotted overrides, validated with messages that name the key."""

from __future__ import annotations

import pytest
import yaml

from prefopt import config
from prefopt.errors import PrefoptError


def write(tmp_path, text: str, name: str = "cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


BASE = """\
model:
  name: some/model
data:
  train: pairs.jsonl
  max_length: 256
  max_prompt_length: 128
loss:
  beta: 0.1
train:
  lr: 1.0e-4
  batch_size: 8
  max_steps: 10
"""


def test_yaml_values_and_defaults(tmp_path):
    cfg = config.load(write(tmp_path, BASE))
    assert cfg.model.name == "some/model"
    assert cfg.data.train == "pairs.jsonl" and cfg.data.max_length == 256
    assert cfg.train.lr == 1e-4 and cfg.train.batch_size == 8 and cfg.train.max_steps == 10
    assert cfg.loss.name == "sigmoid" and cfg.loss.beta == 0.1
    assert cfg.lora.enabled is False and cfg.reference.precompute is True  # defaults


def test_dotted_overrides_win_over_yaml(tmp_path):
    cfg = config.load(
        write(tmp_path, BASE),
        ["--train.lr", "1e-5", "--loss.beta=0.2", "--lora.enabled", "true", "--data.limit", "40", "--model.name=other"],
    )
    assert cfg.train.lr == pytest.approx(1e-5) and isinstance(cfg.train.lr, float)
    assert cfg.loss.beta == pytest.approx(0.2)
    assert cfg.lora.enabled is True
    assert cfg.data.limit == 40
    assert cfg.model.name == "other"
    # keys the overrides do not touch keep their YAML values
    assert cfg.train.batch_size == 8 and cfg.data.max_length == 256


def test_yaml_11_exponent_without_dot(tmp_path):
    # PyYAML reads 5e-6 as a string; a float key must still accept it
    cfg = config.load(write(tmp_path, "train:\n  lr: 5e-6\n"))
    assert cfg.train.lr == pytest.approx(5e-6)


def test_overrides_without_file():
    cfg = config.load(None, ["--data.train", "x.jsonl", "--train.max_steps", "3"])
    assert cfg.data.train == "x.jsonl" and cfg.train.max_steps == 3


def test_dpo_alias_is_normalised():
    assert config.from_dict({"loss": {"name": "dpo"}}).loss.name == "sigmoid"


def test_resolved_round_trips(tmp_path):
    cfg = config.load(write(tmp_path, BASE), ["--lora.enabled", "true"])
    out = tmp_path / "prefopt.yaml"
    config.save(cfg, out)
    again = config.from_dict(yaml.safe_load(out.read_text()))
    assert again == cfg


def error(tmp_path, text, overrides=None):
    with pytest.raises(PrefoptError) as info:
        config.load(write(tmp_path, text), overrides)
    return str(info.value)


def test_unknown_section(tmp_path):
    msg = error(tmp_path, "trainer:\n  lr: 1\n")
    assert "'trainer'" in msg and "cfg.yaml" in msg and "unknown section" in msg


def test_unknown_key(tmp_path):
    # learning_rate is transformers' name of train.lr (tests/test_config_trl.py); a misspelling is unknown
    msg = error(tmp_path, "train:\n  learnig_rate: 1e-5\n")
    assert "'train.learnig_rate'" in msg and "cfg.yaml" in msg and "unknown key" in msg
    msg = error(tmp_path, BASE, ["--loss.betta", "0.2"])
    assert "'loss.betta'" in msg


def test_wrong_type(tmp_path):
    msg = error(tmp_path, 'train:\n  batch_size: "x"\n')
    assert "'train.batch_size'" in msg and "integer" in msg and "'x'" in msg
    msg = error(tmp_path, BASE, ["--lora.enabled", "maybe"])
    assert "'lora.enabled'" in msg
    msg = error(tmp_path, BASE, ["--train.lr", "fast"])
    assert "'train.lr'" in msg and "number" in msg
    msg = error(tmp_path, "train:\n  batch_size: 2.5\n")
    assert "'train.batch_size'" in msg
    # a key that takes one of several types names every choice, and the value once
    msg = error(tmp_path, "train:\n  gradient_checkpointing: [1]\n")
    assert "'train.gradient_checkpointing' must be true or false or a string, found [1]." in msg
    assert msg.count("[1]") == 1
    assert "'train.gradient_checkpointing'" in error(tmp_path, "train:\n  gradient_checkpointing: maybe\n")


def test_bool_is_not_an_int(tmp_path):
    assert "'train.max_steps'" in error(tmp_path, "train:\n  max_steps: true\n")


def test_out_of_range_values(tmp_path):
    assert "'loss.beta'" in error(tmp_path, "loss:\n  beta: 0\n")
    assert "'train.batch_size'" in error(tmp_path, "train:\n  batch_size: 0\n")
    assert "'data.max_prompt_length'" in error(tmp_path, "data:\n  max_length: 64\n  max_prompt_length: 64\n")
    assert "'loss.name'" in error(tmp_path, "loss:\n  name: ipo-typo\n")
    assert "'data.truncation'" in error(tmp_path, "data:\n  truncation: keep_start\n")


def test_yaml_syntax_error_names_line(tmp_path):
    text = "model:\n  name: x\ntrain:\n  lr: [1e-5\n  batch_size: 2\n"
    msg = error(tmp_path, text)
    assert "cfg.yaml" in msg and "not valid YAML" in msg
    assert "line 5" in msg  # where the parser notices the unclosed [
    msg = error(tmp_path, "model:\n  name: x\n   dtype: float32\n")
    assert "line 3" in msg


def test_section_not_a_mapping(tmp_path):
    assert "'train'" in error(tmp_path, "train: 5\n")


def test_missing_config_file(tmp_path):
    with pytest.raises(PrefoptError, match="nope.yaml: config file not found"):
        config.load(str(tmp_path / "nope.yaml"))


def test_bad_override_syntax():
    with pytest.raises(PrefoptError, match="--train.lr 1e-5"):
        config.load(None, ["train.lr", "1"])
    with pytest.raises(PrefoptError, match="needs a value"):
        config.load(None, ["--train.lr"])
    with pytest.raises(PrefoptError, match="--section.key"):
        config.load(None, ["--train.a.b", "1"])


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("data", "limit", 0),
        ("data", "max_prompt_length", 0),
        ("train", "warmup_ratio", 1.5),
        ("train", "epochs", -1),
        ("loss", "beta", 0),
    ],
)
def test_out_of_range_values_name_the_key(section, key, value):
    from prefopt.config import from_dict
    from prefopt.errors import PrefoptError

    with pytest.raises(PrefoptError, match=f"{section}.{key}"):
        from_dict({section: {key: value}})


def test_hyperparameter_of_another_loss_is_ignored_with_a_warning(caplog):
    """A DPO YAML (beta) switched to ORPO on the command line still runs: beta is said and dropped."""
    import logging

    with caplog.at_level(logging.WARNING, logger="prefopt"):
        cfg = config.from_dict({"loss": {"name": "orpo", "beta": 0.1}})
    assert cfg.loss.beta is None and cfg.loss.orpo_lambda is not None
    assert "loss.beta = 0.1 is not used by loss 'orpo'" in caplog.text and "orpo_lambda" in caplog.text
