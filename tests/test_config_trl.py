"""prefopt.config for TRL users: TRL/transformers/peft names as aliases of prefopt's keys, other
TrainingArguments and peft.LoraConfig fields passed through, the keys prefopt sets itself refused,
`did you mean`, the new keys, and `describe()`, the reference of every key."""

from __future__ import annotations

import dataclasses
import re

import peft
import pytest
import yaml

from prefopt import config
from prefopt.errors import PrefoptError


def write(tmp_path, text: str, name: str = "cfg.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error(raw: dict, source: str = "cfg.yaml") -> str:
    with pytest.raises(PrefoptError) as info:
        config.from_dict(raw, source)
    return str(info.value)


# --- aliases -----------------------------------------------------------------------------------------

# section, alias, a value, the prefopt key it sets (and the value it has there)
ALIAS_CASES = [
    ("train", "learning_rate", 1e-5, "lr", 1e-5),
    ("train", "per_device_train_batch_size", 2, "batch_size", 2),
    ("train", "gradient_accumulation_steps", 8, "grad_accum", 8),
    ("train", "num_train_epochs", 3, "epochs", 3.0),
    ("train", "lr_scheduler_type", "cosine", "scheduler", "cosine"),
    ("train", "dataloader_num_workers", 2, "num_workers", 2),
    ("train", "activation_checkpointing", False, "gradient_checkpointing", False),
    ("train", "hub_private_repo", True, "hub_private", True),
    ("loss", "loss_type", "ipo", "name", "ipo"),
    ("loss", "use_weighting", True, "wpo", True),
    ("lora", "lora_alpha", 64, "alpha", 64),
    ("lora", "lora_dropout", 0.05, "dropout", 0.05),
    ("lora", "lora_r", 8, "r", 8),
    ("lora", "lora_target_modules", ["q_proj", "v_proj"], "target_modules", ["q_proj", "v_proj"]),
    ("lora", "use_peft", True, "enabled", True),
    ("model", "model_name_or_path", "org/model", "name", "org/model"),
    ("model", "model_revision", "main", "revision", "main"),
    ("model", "torch_dtype", "bfloat16", "dtype", "bfloat16"),
    ("data", "dataset_name", "org/prefs", "train", "org/prefs"),
    ("data", "dataset_train_split", "train_prefs", "split", "train_prefs"),
    ("data", "dataset_test_split", "test_prefs", "eval_split", "test_prefs"),
    ("reference", "precompute_ref_log_probs", False, "precompute", False),
]


def test_every_alias_is_tested():
    tested = {(section, alias) for section, alias, *_ in ALIAS_CASES}
    elsewhere = {("lora", "lora_modules_to_save"), ("loss", "ref_model_mixup_alpha"), ("loss", "ref_model_sync_steps")}
    assert tested | elsewhere == {(s, a) for s, names in config.ALIASES.items() for a in names}


@pytest.mark.parametrize("section,alias,value,key,expected", ALIAS_CASES)
def test_alias_sets_its_prefopt_key(section, alias, value, key, expected):
    cfg = config.from_dict({section: {alias: value}})
    assert getattr(getattr(cfg, section), key) == expected
    saved = cfg.resolved()[section]
    assert alias not in saved and saved[key] == expected  # the resolved config has prefopt's names


def test_each_alias_names_a_key_of_its_section_or_a_passthrough_field():
    for section, names in config.ALIASES.items():
        keys = {f.name for f in dataclasses.fields(getattr(config.Config(), section))}
        for alias, key in names.items():
            assert key in keys or key in config.passthrough_names(section), (section, alias)
            assert alias not in keys


def test_alias_and_its_key_together_is_an_error_naming_both():
    msg = error({"train": {"learning_rate": 1e-5, "lr": 2e-5}})
    assert msg == "cfg.yaml: 'train.learning_rate' and 'train.lr' both set train.lr; give only one."
    msg = error({"lora": {"alpha": 8, "lora_alpha": 16}})
    assert "'lora.alpha' and 'lora.lora_alpha' both set lora.alpha" in msg


def test_alias_and_key_on_one_command_line_is_an_error():
    with pytest.raises(PrefoptError, match=r"'train\.lr' and 'train\.learning_rate' both set train\.lr"):
        config.load(None, ["--train.lr", "1e-5", "--train.learning_rate", "2e-5"])


def test_override_under_an_alias_replaces_the_files_key(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1.0e-4\n  optim: sgd\nlora:\n  lora_alpha: 8\n")
    cfg = config.load(path, ["--train.learning_rate", "3e-5", "--lora.alpha", "4"])
    assert cfg.train.lr == pytest.approx(3e-5) and cfg.lora.alpha == 4
    assert cfg.train.args == {"optim": "sgd"}


def test_alias_with_a_wrong_value_names_the_alias():
    msg = error({"train": {"learning_rate": "fast"}})
    assert msg == "cfg.yaml: 'train.learning_rate' must be a number, found 'fast'."
    msg = error({"loss": {"loss_type": ["sigmoid", "sft"]}})
    assert "'loss.loss_type' must be a string, found ['sigmoid', 'sft']" in msg and "combine" in msg


# --- pass-through to TrainingArguments ---------------------------------------------------------------


def test_training_arguments_fields_pass_through(tmp_path):
    text = (
        "train:\n  optim: adamw_torch\n  adam_beta2: 0.95\n  adam_epsilon: 1e-8\n  run_name: trl-at-home\n"
        "  lr_scheduler_kwargs: {min_lr_rate: 0.1}\n  scheduler: cosine_with_min_lr\n  dataloader_pin_memory: false\n"
    )
    cfg = config.load(write(tmp_path, text))
    assert config.training_args_kwargs(cfg) == {
        "optim": "adamw_torch",
        "adam_beta2": 0.95,
        "adam_epsilon": pytest.approx(1e-8),  # YAML 1.1 reads 1e-8 as a string: coerced by the field's type
        "run_name": "trl-at-home",
        "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
        "dataloader_pin_memory": False,
    }
    assert isinstance(cfg.train.args["adam_epsilon"], float)
    assert config.training_args_kwargs(cfg) is not cfg.train.args


def test_passthrough_names_are_training_arguments_fields_prefopt_does_not_own():
    from transformers import TrainingArguments

    names = config.passthrough_names("train")
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    assert {"optim", "adam_beta1", "adam_beta2", "adam_epsilon", "run_name", "torch_compile"} <= set(names)
    assert set(names) <= fields
    own = {f.name for f in dataclasses.fields(config.TrainConfig)} | set(config.ALIASES["train"])
    assert not own & set(names)
    for key in ("output_dir", "learning_rate", "save_strategy", "eval_strategy", "use_cpu", "report_to", "seed"):
        assert key not in names


@pytest.mark.parametrize(
    "key,value,what",
    [
        ("optim", "adamw_troch", "must be one of adamw_torch"),
        ("adam_beta1", "x", "must be a number, found 'x'"),
        ("adam_beta1", float("nan"), "must be a finite number"),
        ("torch_compile", "yes", "must be true or false"),
        ("lr_scheduler_kwargs", [1], "must be a mapping or a string"),
        ("parallelism_config", {}, "a Python object, which a config cannot give"),
    ],
)
def test_passthrough_value_of_the_wrong_type_names_the_key(key, value, what):
    msg = error({"train": {key: value}})
    assert msg.startswith(f"cfg.yaml: 'train.{key}' ") and what in msg


def test_enum_typo_says_did_you_mean():
    assert "found 'adamw_troch' (did you mean 'adamw_torch'?)" in error({"train": {"optim": "adamw_troch"}})


@pytest.mark.parametrize("key", sorted(config._MANAGED["train"]))
def test_training_arguments_prefopt_sets_itself_are_refused(key):
    msg = error({"train": {key: None}})
    assert msg.startswith(
        f"cfg.yaml: 'train.{key}' is a transformers.TrainingArguments field that prefopt sets itself: "
    )


def test_refusals_name_the_prefopt_key_to_use():
    assert "set train.save_steps" in error({"train": {"save_strategy": "no"}})
    assert "train.batch_size" in error({"train": {"per_device_eval_batch_size": 8}})
    assert "train.warmup_ratio" in error({"train": {"warmup_steps": 10}})
    assert "HF_TOKEN" in error({"train": {"hub_token": "hf_secret"}})
    assert "--resume" in error({"train": {"resume_from_checkpoint": "x"}})


def test_training_arguments_prefopt_passes_are_never_passed_through(monkeypatch):
    """Every keyword the recipe's training_arguments gives TrainingArguments is prefopt's: none can come
    from train.args too (a duplicate keyword would be a TypeError), except the defaults train.args
    may replace (setup.PASSTHROUGH_DEFAULTS), where the user's value wins."""
    from prefopt.training import setup

    seen = {}

    class Recorder:
        __dataclass_fields__ = setup.TrainingArguments.__dataclass_fields__

        def __init__(self, **kw):
            seen.update(kw)

    monkeypatch.setattr(setup, "TrainingArguments", Recorder)
    cfg = config.from_dict({"train": {"optim": "sgd"}})
    setup.training_arguments(cfg, bf16=False)
    passed = set(config.passthrough_names("train")) - set(config.training_args_kwargs(cfg))
    assert seen and set(seen) & passed == set(setup.PASSTHROUGH_DEFAULTS)
    assert seen["ddp_find_unused_parameters"] is False
    cfg = config.from_dict({"train": {"ddp_find_unused_parameters": True}})
    setup.training_arguments(cfg, bf16=False)
    assert seen["ddp_find_unused_parameters"] is True


def test_check_training_args_names_the_key_transformers_refuses(tmp_path):
    from transformers import TrainingArguments

    cfg = config.from_dict({"train": {"load_best_model_at_end": True, "run_name": "x"}})

    def build():
        kw = config.training_args_kwargs(cfg)
        return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="steps", **kw)

    with pytest.raises(PrefoptError) as info:
        config.check_training_args(cfg, build, "cfg.yaml")
    msg = str(info.value)
    assert msg.startswith("cfg.yaml: transformers.TrainingArguments refused 'train.load_best_model_at_end' = True: ")
    assert "run_name" not in msg and "save and eval strategy" in msg


def test_check_training_args_without_passthrough_keys_propagates():
    def build():
        raise ValueError("a bug of prefopt's own")

    with pytest.raises(ValueError, match="a bug"):
        config.check_training_args(config.Config(), build)
    assert config.check_training_args(config.Config(), lambda: 7) == 7


def test_train_args_given_as_a_mapping_and_as_keys(tmp_path):
    cfg = config.from_dict({"train": {"args": {"optim": "sgd"}, "adam_beta1": 0.8}})
    assert cfg.train.args == {"optim": "sgd", "adam_beta1": 0.8}
    assert "'train.optim' and 'train.args.optim' both set train.optim" in error(
        {"train": {"optim": "adamw_torch", "args": {"optim": "sgd"}}}
    )
    assert "'train.args.lr' is prefopt's own key: give it as train.lr" in error({"train": {"args": {"lr": 1}}})
    assert "'train.args.learning_rate' is prefopt's own key: give it as train.lr" in error(
        {"train": {"args": {"learning_rate": 1}}}
    )


def test_override_replaces_an_entry_of_train_args(tmp_path):
    path = write(tmp_path, "train:\n  args:\n    optim: sgd\n    adam_beta1: 0.8\n")
    cfg = config.load(path, ["--train.optim", "adamw_torch"])
    assert cfg.train.args == {"adam_beta1": 0.8, "optim": "adamw_torch"}


def test_a_config_built_in_code_is_validated_too():
    cfg = config.Config()
    cfg.train.args = {"save_strategy": "no"}
    with pytest.raises(PrefoptError, match="'train.save_strategy' is a transformers.TrainingArguments field"):
        config.validate(cfg)
    cfg.train.args = {"optim": "nope"}
    with pytest.raises(PrefoptError, match="'train.optim' must be one of"):
        config.validate(cfg)


def test_scheduler_with_kwargs_is_accepted_with_lr_scheduler_kwargs():
    assert "set train.lr_scheduler_kwargs" in error({"train": {"scheduler": "cosine_with_min_lr"}})
    cfg = config.from_dict({"train": {"scheduler": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": 0.1}}})
    assert cfg.train.args == {"lr_scheduler_kwargs": {"min_lr_rate": 0.1}}


# --- pass-through to peft.LoraConfig -----------------------------------------------------------------


def test_lora_passthrough_and_peft_kwargs():
    cfg = config.from_dict(
        {
            "lora": {
                "enabled": True,
                "lora_alpha": 64,
                "lora_dropout": 0.1,
                "use_dora": True,
                "use_rslora": True,
                "modules_to_save": ["lm_head"],
                "init_lora_weights": "gaussian",
                "rank_pattern": {"q_proj": 4},
            }
        }
    )
    kw = cfg.lora.peft_kwargs()
    assert kw == {
        "r": 16,
        "lora_alpha": 64,
        "lora_dropout": 0.1,
        "target_modules": "all-linear",
        "use_dora": True,
        "use_rslora": True,
        "modules_to_save": ["lm_head"],
        "init_lora_weights": "gaussian",
        "rank_pattern": {"q_proj": 4},
        "task_type": "CAUSAL_LM",
    }
    lora = peft.LoraConfig(**kw)
    assert lora.use_dora and lora.lora_alpha == 64 and lora.modules_to_save == ["lm_head"]


def test_trl_lora_modules_to_save_is_peft_modules_to_save():
    cfg = config.from_dict({"lora": {"lora_modules_to_save": ["lm_head"]}})
    assert cfg.lora.args == {"modules_to_save": ["lm_head"]}


@pytest.mark.parametrize(
    "raw,what",
    [
        ({"bias": "some"}, "'lora.bias' must be one of none, all, lora_only, found 'some'."),
        ({"use_dora": "yes"}, "'lora.use_dora' must be true or false, found 'yes'."),
        # typing caches Union[list[int], int] and Union[int, list[int]] as one object, so the order of
        # the two depends on which another library built first: either order is right
        (
            {"layers_to_transform": "x"},
            "'lora.layers_to_transform' must be (a list or an integer|an integer or a list), found 'x'.",
        ),
        ({"task_type": "SEQ_CLS"}, "'lora.task_type' is a peft.LoraConfig field that prefopt sets itself"),
        ({"revision": "main"}, "model.revision"),
        ({"use_dora": True, "lora_bias": True}, "peft.LoraConfig refused 'lora.use_dora' = True, 'lora.lora_bias'"),
    ],
)
def test_lora_passthrough_errors(raw, what):
    message = error({"lora": raw})
    assert what in message or re.search(what.replace(".", r"\.").replace("(a list", "(a list"), message)


def test_init_lora_weights_pattern_choice_is_accepted():
    assert config.from_dict({"lora": {"init_lora_weights": "pissa_niter_4"}}).lora.args == {
        "init_lora_weights": "pissa_niter_4"
    }


# --- did you mean, and keys of another section ------------------------------------------------------


def test_unknown_key_says_did_you_mean_and_lists_the_keys():
    msg = error({"train": {"learnig_rate": 1e-5}})
    assert msg.startswith("cfg.yaml: unknown key 'train.learnig_rate' (did you mean 'learning_rate'?). ")
    assert "Known keys of 'train': output_dir, epochs," in msg and "transformers.TrainingArguments field" in msg
    assert "(did you mean 'adam_epsilon'?)" in error({"train": {"adam_epsilo": 1e-8}})
    assert "(did you mean 'use_dora'?)" in error({"lora": {"use_doral": True}})
    msg = error({"reference": {"precompte": False}})
    assert "(did you mean 'precompute'?)" in msg and "Known keys of 'reference': precompute, cache_dir" in msg


@pytest.mark.parametrize(
    "section,key,where",
    [
        ("train", "beta", "belongs under 'loss:' (loss.beta)"),
        ("train", "max_length", "belongs under 'data:' (data.max_length)"),
        ("train", "max_prompt_length", "belongs under 'data:' (data.max_prompt_length)"),
        ("train", "loss_type", "belongs under 'loss:' (loss.loss_type, prefopt's loss.name)"),
        ("train", "precompute_ref_log_probs", "belongs under 'reference:'"),
        ("train", "use_dora", "belongs under 'lora:' (lora.use_dora)"),
        ("lora", "optim", "belongs under 'train:' (train.optim)"),
        ("model", "trust_remote_code", None),  # a key of model: no error
        ("train", "trust_remote_code", "belongs under 'model:'"),
        ("data", "truncation_mode", "prefopt's is data.truncation: keep_end"),
        ("train", "f_alpha_divergence_coef", "1 - prefopt's loss.f_alpha"),
        ("loss", "f_divergence_type", "js (TRL's js_divergence)"),
        ("loss", "loss_weights", "loss.weights, a mapping"),
        ("train", "sync_ref_model", "TR-DPO"),
        ("train", "padding_free", "a TRL DPOConfig option that prefopt does not have"),
    ],
)
def test_trl_names_say_where_they_are_in_prefopt(section, key, where):
    if where is None:
        config.from_dict({section: {key: True}})
        return
    msg = error({section: {key: 1}})
    assert msg.startswith(f"cfg.yaml: unknown key '{section}.{key}': ") and where in msg


def test_experiment_style_set_keys_is_unchanged():
    @dataclasses.dataclass
    class Small:
        beta: float = 0.1

    obj = Small()
    config.set_keys(obj, {"beta": "0.5"}, "x.yaml")
    assert obj.beta == 0.5
    with pytest.raises(
        PrefoptError, match=r"x.yaml: unknown key 'betas' \(did you mean 'beta'\?\)\. Known keys: beta\."
    ):
        config.set_keys(obj, {"betas": 1}, "x.yaml")


# --- new keys ---------------------------------------------------------------------------------------


def test_min_score_gap():
    assert config.Config().data.min_score_gap is None
    assert config.from_dict({"data": {"min_score_gap": 1}}).data.min_score_gap == 1.0
    assert "'data.min_score_gap' must be >= 0 (or null: off), found -0.5." in error({"data": {"min_score_gap": -0.5}})
    assert "'data.min_score_gap' must be a number" in error({"data": {"min_score_gap": "big"}})


def test_eval_split():
    cfg = config.from_dict({"data": {"train": "org/prefs", "eval_split": "test_prefs"}, "train": {"eval_steps": 5}})
    assert cfg.data.eval_split == "test_prefs"
    msg = error({"data": {"train": "org/prefs", "eval_split": "train"}})
    assert "'data.eval_split' is 'train', the split data.train trains on" in msg
    msg = error({"data": {"train": "org/prefs:train_prefs", "eval_split": "train_prefs"}})
    assert "the split data.train trains on" in msg
    assert config.from_dict({"data": {"train": "a/b", "eval": "c/d", "eval_split": "train"}}).data.eval_split == "train"
    msg = error({"data": {"train": "a/b", "eval": "c/d:validation", "eval_split": "test"}})
    assert "names the split 'validation'; give only one of them" in msg
    assert "must be a split name" in error({"data": {"eval_split": "a/b"}})


def test_hub_keys():
    cfg = config.from_dict({"train": {"push_to_hub": True, "hub_model_id": "me/my-model", "hub_private": True}})
    assert (cfg.train.push_to_hub, cfg.train.hub_model_id, cfg.train.hub_private) == (True, "me/my-model", True)
    assert "'train.hub_model_id' is not set, but train.push_to_hub is true" in error({"train": {"push_to_hub": True}})
    assert "'train.hub_model_id' must look like owner/name" in error({"train": {"hub_model_id": "my-model"}})
    assert "'train.hub_model_id' must look like owner/name" in error({"train": {"hub_model_id": "me/my model"}})
    assert "'train.hub_model_id' must look like owner/name" in error({"train": {"hub_model_id": "a/b/c"}})
    for key in ("hub_token", "token"):
        assert key not in {f.name for f in dataclasses.fields(config.TrainConfig)}


# --- the resolved config -----------------------------------------------------------------------------

TRL_STYLE = """\
model:
  model_name_or_path: some/model
lora:
  use_peft: true
  lora_r: 8
  lora_alpha: 16
  use_dora: true
  modules_to_save: [lm_head]
data:
  dataset_name: org/prefs
  dataset_test_split: test_prefs
  min_score_gap: 0.5
loss:
  loss_type: ipo
  beta: 0.2
train:
  learning_rate: 5.0e-7
  per_device_train_batch_size: 2
  gradient_accumulation_steps: 8
  num_train_epochs: 2
  lr_scheduler_type: cosine
  optim: adamw_torch
  adam_beta2: 0.95
  run_name: dpo-at-home
  push_to_hub: true
  hub_model_id: me/dpo-at-home
"""


def test_resolved_config_of_trl_names_uses_prefopts_and_loads_again(tmp_path):
    cfg = config.load(write(tmp_path, TRL_STYLE))
    out = tmp_path / "prefopt.yaml"
    config.save(cfg, out)
    saved = yaml.safe_load(out.read_text())
    assert saved["train"]["lr"] == 5e-7 and "learning_rate" not in saved["train"]
    assert saved["train"]["args"] == {"optim": "adamw_torch", "adam_beta2": 0.95, "run_name": "dpo-at-home"}
    assert saved["lora"]["args"] == {"use_dora": True, "modules_to_save": ["lm_head"]}
    assert saved["lora"]["alpha"] == 16 and saved["loss"]["name"] == "ipo" and saved["data"]["train"] == "org/prefs"
    assert config.load(str(out)) == cfg
    assert config.from_dict(saved) == cfg
    again = config.load(str(out), ["--train.adam_beta2", "0.99", "--train.learning_rate", "1e-6"])
    assert again.train.args["adam_beta2"] == 0.99 and again.train.lr == pytest.approx(1e-6)


# --- describe ----------------------------------------------------------------------------------------


def test_every_key_has_a_meaning():
    for section in config.SECTIONS:
        for f in dataclasses.fields(getattr(config.Config(), section)):
            assert f.metadata.get("help"), f"{section}.{f.name}"


def test_describe_is_yaml_that_loads_back_to_the_defaults(tmp_path):
    text = config.describe()
    assert config.load(write(tmp_path, text)) == config.load(None)
    raw = yaml.safe_load(text)
    assert list(raw) == list(config.SECTIONS)
    for section in config.SECTIONS:
        keys = [f.name for f in dataclasses.fields(getattr(config.Config(), section))]
        assert list(raw[section]) == keys
        one = config.describe(section)
        assert list(yaml.safe_load(one)) == [section]
        assert config.load(write(tmp_path, one, f"{section}.yaml")) == config.load(None)


def test_describe_shows_defaults_meanings_and_names():
    text = config.describe("train")
    assert "  lr: 5.0e-06  # peak learning rate\n" in text
    assert "learning_rate (= lr)" in text and "optim" in text and "adam_beta1" in text
    assert "refused here: per_device_eval_batch_size" in text
    assert "parallelism_config" not in text  # a Python object: no config can give it
    assert all(len(line) <= 122 for line in text.splitlines() if line.startswith("#"))
    data = config.describe("data")
    assert '  user_marker: "\\n\\nHuman:"  # ' in data and "dataset_test_split (= eval_split)" in data


def test_describe_unknown_section():
    with pytest.raises(PrefoptError, match=r"unknown section 'trian' \(did you mean 'train'\?\)\. Known sections"):
        config.describe("trian")


# --- TR-DPO and the other losses of issue 16 ---------------------------------------------------------


def test_trl_tr_dpo_settings_are_tr_dpo():
    """TRL's DPOConfig TR-DPO: sync_ref_model: true makes DPO tr_dpo, and ref_model_mixup_alpha /
    ref_model_sync_steps are its loss.tr_alpha / loss.tr_tau."""
    trl = {"loss_type": "sigmoid", "beta": 0.1, "sync_ref_model": True}
    cfg = config.from_dict({"loss": {**trl, "ref_model_mixup_alpha": 0.5, "ref_model_sync_steps": 64}})
    assert (cfg.loss.name, cfg.loss.tr_alpha, cfg.loss.tr_tau) == ("tr_dpo", 0.5, 64)
    assert cfg.reference.precompute is False
    saved = cfg.resolved()["loss"]
    assert "sync_ref_model" not in saved and "ref_model_mixup_alpha" not in saved and saved["tr_tau"] == 64
    for loss in ({"sync_ref_model": True}, {"name": "dpo", "sync_ref_model": True}):  # DPO is TRL's default
        assert config.from_dict({"loss": loss}).loss.name == "tr_dpo"
    assert config.from_dict({"loss": {"loss_type": "ipo", "sync_ref_model": False}}).loss.name == "ipo"
    # without sync_ref_model, TRL ignores the other two; so does DPO here (said in a warning)
    assert config.from_dict({"loss": {"ref_model_sync_steps": 64}}).loss.tr_tau is None


@pytest.mark.parametrize(
    "loss, message",
    [
        (
            {"loss_type": "ipo", "sync_ref_model": True},
            "'loss.sync_ref_model' is true (TRL's TR-DPO), but loss.name is 'ipo': prefopt's moving reference is "
            "the loss tr_dpo",
        ),
        ({"name": "tr_dpo", "sync_ref_model": False}, "'loss.sync_ref_model' is false, but loss.name is tr_dpo"),
        ({"sync_ref_model": "yes"}, "'loss.sync_ref_model' must be true or false, found 'yes'."),
        ({"name": "tr_dpo", "ref_model_mixup_alpha": 1.5}, "'loss.tr_alpha' must be in (0, 1], found 1.5."),
        ({"name": "tr_dpo", "tr_tau": 0}, "'loss.tr_tau' must be >= 1 (optimizer steps between reference updates)"),
        ({"name": "tr_dpo", "tr_tau": 2.5}, "'loss.tr_tau' must be an integer"),
        ({"name": "beta_dpo", "beta_dpo_rho": 0}, "'loss.beta_dpo_rho' must be in (0, 1], found 0.0."),
    ],
)
def test_bad_tr_dpo_and_beta_dpo_settings(loss, message):
    assert message in error({"loss": loss})


def test_sync_ref_model_in_another_section_names_its_section():
    assert "it is TRL's TR-DPO switch, a key of loss: (sync_ref_model: true is loss.name: tr_dpo)" in error(
        {"train": {"sync_ref_model": True}}
    )


def test_prefopt_config_loss_lists_the_new_hyperparameters():
    text = config.describe("loss")
    for key in ("dpop_lambda", "beta_dpo_alpha", "beta_dpo_rho", "tr_alpha", "tr_tau", "alphapo_alpha"):
        assert f"  {key}: null  # " in text, key
    assert "ref_model_mixup_alpha (= tr_alpha)" in text and "ref_model_sync_steps (= tr_tau)" in text
    assert "sync_ref_model: true is loss.name: tr_dpo" in " ".join(line.lstrip("# ") for line in text.splitlines())
    assert "  precompute: null  # " in config.describe("reference")
