"""prefopt.config refuses every bad value and bad YAML file with a PrefoptError that names the file,
the key and the value: never a traceback, never a silent default."""

from __future__ import annotations

import dataclasses
import time
import typing

import pytest

from prefopt import config
from prefopt.errors import PrefoptError


def load(tmp_path, content, overrides=None, name="cfg.yaml"):
    """config.load of a file holding `content` (str or bytes); None: no file."""
    path = None
    if content is not None:
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return config.load(str(path) if path else None, overrides)


def error(tmp_path, content, overrides=None, name="cfg.yaml") -> str:
    with pytest.raises(PrefoptError) as info:
        load(tmp_path, content, overrides, name)
    return str(info.value)


# --- 1. every float key is finite -----------------------------------------------------------------


def _float_keys() -> list[str]:
    """Every `section.key` whose annotation admits a float, found from the dataclasses themselves."""
    keys = []
    for section in config.SECTIONS:
        for name, annotation in typing.get_type_hints(type(getattr(config.Config(), section))).items():
            if annotation is float or float in typing.get_args(annotation):
                keys.append(f"{section}.{name}")
    return keys


FLOAT_KEYS = _float_keys()


def test_the_float_keys_are_found():
    for key in ("train.lr", "train.epochs", "train.max_grad_norm", "loss.beta", "loss.ld_alpha", "lora.dropout"):
        assert key in FLOAT_KEYS
    assert "data.eval_fraction" in FLOAT_KEYS and "data.ratings_min_gap" in FLOAT_KEYS


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("spelling,shown", [(".nan", "nan"), (".inf", "inf"), ("-.inf", "-inf")])
def test_yaml_non_finite_float_is_an_error(tmp_path, key, spelling, shown):
    section, name = key.split(".")
    msg = error(tmp_path, f"{section}:\n  {name}: {spelling}\n")
    assert f"cfg.yaml: '{key}' must be a finite number, found {shown}." in msg


@pytest.mark.parametrize("key", ["train.lr", "loss.beta", "data.eval_fraction", "lora.dropout"])
@pytest.mark.parametrize("text", [".nan", "-.inf", "nan", "inf", "-Infinity", "1e999"])
def test_override_non_finite_float_is_an_error(key, text):
    with pytest.raises(PrefoptError) as info:
        config.load(None, [f"--{key}", text])
    msg = str(info.value)
    assert msg.startswith(f"command line: '{key}' must be a finite number, found ")
    assert text.lstrip("-.").lower()[:3] in msg.lower()


def test_int_beyond_the_float_range_is_an_error():
    with pytest.raises(PrefoptError, match=r"'train\.epochs' must be a finite number, found 1000"):
        config.load(None, ["--train.epochs", str(10**400)])


def test_non_finite_combine_weight_is_an_error():
    with pytest.raises(PrefoptError, match=r"'loss\.weights' gives 'sigmoid' .*found nan"):
        config.from_dict({"loss": {"name": "combine", "weights": {"sigmoid": float("nan")}}})


def test_non_finite_float_set_in_code_is_an_error():
    cfg = config.Config()
    cfg.train.weight_decay = float("inf")
    with pytest.raises(PrefoptError, match=r"'train\.weight_decay' must be a finite number, found inf"):
        config.complete(cfg)


# --- 2. ranges and choices --------------------------------------------------------------------------

RANGES = {
    "train.logging_steps-0": ("train", "logging_steps", 0, "must be >= 1"),
    "train.num_workers-minus-1": ("train", "num_workers", -1, "must be >= 0"),
    "train.seed-minus-1": ("train", "seed", -1, "must be in [0, 4294967295]"),
    "train.seed-2**32": ("train", "seed", 2**32, "must be in [0, 4294967295]"),
    "train.max_steps-0": ("train", "max_steps", 0, "must be >= 1 (or -1"),
    "train.max_steps-minus-2": ("train", "max_steps", -2, "must be >= 1 (or -1"),
    "train.max_grad_norm-minus-1": ("train", "max_grad_norm", -1, "must be >= 0 (0 = no clipping)"),
    "train.lm_head_chunk-minus-1": ("train", "lm_head_chunk", -1, "must be >= 0"),
    "lora.alpha-0": ("lora", "alpha", 0, "must be > 0"),
    "lora.alpha-minus-8": ("lora", "alpha", -8, "must be > 0"),
    "lora.dropout-1": ("lora", "dropout", 1, "must be in [0, 1)"),
    "lora.dropout-minus-0.1": ("lora", "dropout", -0.1, "must be in [0, 1)"),
    "lora.target_modules-nested": ("lora", "target_modules", [[1]], "must be a string or a list of module names"),
    "lora.target_modules-empty": ("lora", "target_modules", [], "must be a string or a list of module names"),
    "train.report_to-nested": ("train", "report_to", [[1]], "has [1]"),
    "data.fields-list-value": ("data", "fields", {"prompt": [1]}, "must map field names to field names"),
    "model.attn_implementation-bogus": ("model", "attn_implementation", "bogus", "must be one of eager"),
    "train.scheduler-linearr": ("train", "scheduler", "linearr", "must be one of linear, cosine"),
    "train.scheduler-min-lr": ("train", "scheduler", "cosine_with_min_lr", "needs lr_scheduler_kwargs"),
    "train.scheduler-wsd": ("train", "scheduler", "warmup_stable_decay", "needs lr_scheduler_kwargs"),
    "train.scheduler-plateau-no-eval": ("train", "scheduler", "reduce_lr_on_plateau", "eval_steps >= 1"),
    "train.eval_steps-no-eval-data": ("train", "eval_steps", 5, "no eval data"),
}


@pytest.mark.parametrize("case", RANGES)
def test_out_of_range_value_names_key_and_value(case):
    section, key, value, what = RANGES[case]
    with pytest.raises(PrefoptError) as info:
        config.from_dict({section: {key: value}}, "cfg.yaml")
    msg = str(info.value)
    assert msg.startswith(f"cfg.yaml: '{section}.{key}' ") and what in msg
    shown = value[0] if isinstance(value, list) and value else value
    if isinstance(shown, dict):
        shown = shown["prompt"]
    assert str(shown) in msg


def test_out_of_range_override_names_the_command_line():
    with pytest.raises(PrefoptError, match=r"^command line: 'train\.max_steps' must be >= 1 .*found 0\.$"):
        config.load(None, ["--train.max_steps", "0"])


def test_scheduler_lists_the_choices_and_the_closest():
    with pytest.raises(PrefoptError) as info:
        config.from_dict({"train": {"scheduler": "cosin"}})
    msg = str(info.value)
    for name in ("linear", "cosine", "constant_with_warmup", "inverse_sqrt"):
        assert name in msg
    assert "found 'cosin' (did you mean 'cosine'?)." in msg


def test_attn_implementation_lists_the_choices_and_the_closest():
    with pytest.raises(PrefoptError) as info:
        config.from_dict({"model": {"attn_implementation": "SDPA"}})
    msg = str(info.value)
    assert "eager" in msg and "flash_attention_2" in msg and "(did you mean 'sdpa'?)" in msg


def test_transformers_attn_implementations_are_accepted():
    names = config.attn_implementations()
    assert {"sdpa", "eager", "flash_attention_2"} <= set(names)
    for name in [*names, "kernels-community/flash-attn2"]:  # a hub kernel repo too
        assert config.from_dict({"model": {"attn_implementation": name}}).model.attn_implementation == name


def test_valid_edge_values_pass(tmp_path):
    cfg = load(
        tmp_path,
        "train:\n  lr: 1e-9\n  max_steps: -1\n  max_grad_norm: 0\n  scheduler: cosine\n  seed: 0\n"
        "  num_workers: 0\n  logging_steps: 1\nlora:\n  dropout: 0\n  alpha: 1\n"
        "model:\n  attn_implementation: eager\n",
    )
    t = cfg.train
    assert t.lr == 1e-9 and t.max_steps == -1 and t.max_grad_norm == 0 and t.scheduler == "cosine"
    assert cfg.lora.dropout == 0 and cfg.model.attn_implementation == "eager"
    cfg = config.from_dict(
        {
            "train": {"scheduler": "reduce_lr_on_plateau", "eval_steps": 2, "seed": 2**32 - 1},
            "data": {"eval": "e.jsonl"},
        }
    )
    assert cfg.train.scheduler == "reduce_lr_on_plateau"


# --- 3. and 4. the YAML file ----------------------------------------------------------------------

LAUGHS = "abcdefghi"
BOMB = "".join(
    [f"  - &a [{', '.join(['lol'] * 9)}]\n"]
    + [f"  - &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip(LAUGHS, LAUGHS[1:])]
)

FILES = {
    # id: (file content, what the message says)
    "top-level-list": (b"- model\n- train\n", "expected a mapping of sections"),
    "top-level-scalar": (b"hello\n", "found str 'hello'"),
    "top-level-zero": (b"0\n", "found int 0"),
    "top-level-false": (b"false\n", "found bool False"),
    "not-utf8": (b"train:\n  lr: 1e-5\xff\n", "not UTF-8 text: byte 0xff at offset 17"),
    "utf16": (b"\xff\xfe t\x00r\x00", "not UTF-8 text: byte 0xff at offset 0"),
    "nul-character": (b"train:\n  lr: \x00\n", "line 2: not valid YAML (the character #x0000"),
    "duplicate-section": (b"train:\n  lr: 1e-5\nloss:\n  beta: 0.1\ntrain:\n  max_steps: 2\n", "line 5: 'train'"),
    "duplicate-key": (b"train:\n  lr: 1e-5\n  max_steps: 2\n  lr: 1e-4\n", "line 4: 'train.lr' is given twice"),
    "duplicate-key-flow": (b"train: {lr: 1e-5, lr: 1e-4}\n", "line 1: 'train.lr' is given twice"),
    "alias-bomb": (("train:\n  batch_size:\n" + BOMB).encode(), "'train.batch_size' expands to more than"),
    "alias-bomb-top": (("-\n" + BOMB).encode(), "the document expands to more than"),
    "recursive-alias": (b"train:\n  report_to: &x [*x]\n", "'train.report_to' refers to itself"),
    "deeply-nested": (b"train:\n  report_to: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested too deeply"),
    "huge-integer": (b"train:\n  seed: " + b"7" * 5000 + b"\n", "line 2: the integer '777"),
}


@pytest.mark.parametrize("case", FILES)
def test_bad_yaml_file_names_the_file(tmp_path, case):
    content, what = FILES[case]
    start = time.monotonic()
    msg = error(tmp_path, content, name=f"{case}.yaml")
    assert time.monotonic() - start < 10
    assert msg.startswith(str(tmp_path / f"{case}.yaml") + ":") and what in msg
    assert len(msg) < 600 and "\n" not in msg


def test_duplicate_key_says_where_the_first_one_is(tmp_path):
    msg = error(tmp_path, "train:\n  lr: 1e-5\n  max_steps: 2\n  lr: 1e-4\n")
    assert "(first at line 2)" in msg


def test_alias_bomb_at_a_wrong_typed_key_is_refused_quickly(tmp_path):
    start = time.monotonic()
    msg = error(tmp_path, "train:\n  lr: 1e-5\n  batch_size:\n" + BOMB, name="bomb.yaml")
    assert time.monotonic() - start < 5
    assert "bomb.yaml: line 9: 'train.batch_size' expands to more than 100000 values" in msg


def test_yaml_merge_keys_and_shared_anchors_still_work(tmp_path):
    cfg = load(tmp_path, "train: &t\n  <<: {lr: 1.0e-5, max_steps: 3}\n  lr: 2.0e-5\nlora:\n  target_modules: [q, k]\n")
    assert cfg.train.lr == 2e-5 and cfg.train.max_steps == 3


def test_read_yaml_is_strict_for_every_caller(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("seed: 1\nseed: 2\n")
    with pytest.raises(PrefoptError, match=r"exp\.yaml: line 2: 'seed' is given twice"):
        config.read_yaml(str(path))
    path.write_text("")
    assert config.read_yaml(str(path)) == ({}, str(path))


# --- 5. overrides are YAML too ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,what",
    [
        (["--data.fields", "{a: x, a: y}"], "'--data.fields': 'a' is given twice"),
        (["--train.report_to", "[" * 5000 + "]" * 5000], "'--train.report_to': the value is nested too deeply"),
        (["--train.seed", "9" * 5000], "'--train.seed': the integer '999"),
        (["--train.scheduler=cosine_schedule"], "'train.scheduler' must be one of"),
    ],
)
def test_bad_override_value(overrides, what):
    with pytest.raises(PrefoptError) as info:
        config.load(None, overrides)
    assert str(info.value).startswith("command line: ") and what in str(info.value)


# --- every message shows values bounded -------------------------------------------------------------


def _bomb(levels: int = 9):
    value: list = ["lol"] * 9
    for _ in range(levels - 1):
        value = [value] * 9
    return value


def test_show_is_bounded():
    assert len(config.show(_bomb())) < 200
    assert len(config.show("x" * 10**6)) < 100
    assert config.show(float("nan")) == "nan" and config.show("linearr") == "'linearr'"
    assert config.show(10**5000)  # beyond str()'s digit limit, still something


@pytest.mark.parametrize(
    "raw",
    [
        {"train": _bomb()},
        {"train": {"batch_size": _bomb()}},
        {"train": {"gradient_checkpointing": _bomb()}},
        {"train": {"report_to": _bomb()}},
        {"lora": {"target_modules": _bomb()}},
        {"data": {"fields": {"prompt": _bomb()}}},
        {"loss": {"name": "combine", "weights": {"sigmoid": _bomb()}}},
        {"loss": {"weights": {"sigmoid": _bomb()}}},
        _bomb(),
    ],
    ids=[
        "section",
        "int-key",
        "bool-or-str-key",
        "report_to",
        "target_modules",
        "data.fields",
        "combine-weight",
        "weights-without-combine",
        "top-level",
    ],
)
def test_messages_show_huge_values_briefly(raw):
    start = time.monotonic()
    with pytest.raises(PrefoptError) as info:
        config.from_dict(raw, "cfg.yaml")
    assert time.monotonic() - start < 5 and len(str(info.value)) < 600


def test_every_section_is_covered():
    assert [f.name for f in dataclasses.fields(config.Config)] == list(config.SECTIONS)
