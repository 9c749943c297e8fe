"""One typed config: YAML file + dotted CLI overrides, validated with precise messages.

    model:     what to train (hub id, local folder, .gguf file, or `default`)
    lora:      LoRA adapter settings (enabled: false means a full fine-tune)
    data:      where the preference data is and how it is cut to length
    loss:      which loss of the family, and its hyperparameters
    reference: how reference log-probs are obtained
    train:     optimisation, precision, logging, output folder

Every key has a default, so a config names only what it changes. `resolved()` is the fully
resolved config that is saved beside the trained model. `describe()` prints every key with its
default and meaning (`prefopt config [SECTION]`).

For TRL users: a TRL/transformers/peft name is an alias of exactly one prefopt key of its section
(learning_rate is train.lr, lora_alpha is lora.alpha; ALIASES); the resolved config uses prefopt's
names, and giving an alias with its key is an error naming both. `train:` also takes any other
transformers.TrainingArguments field and `lora:` any other peft.LoraConfig field, kept in the
section's `args` and passed through (`training_args_kwargs`, `LoraConfig.peft_kwargs`), except the
fields prefopt sets itself, which are refused naming the key to use instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import importlib.util
import logging
import math
import re
import reprlib
import textwrap
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import yaml
from huggingface_hub.utils import HFValidationError, validate_repo_id
from peft import LoraConfig as PeftLora
from transformers import SchedulerType, TrainingArguments
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from prefopt import grpo, losses
from prefopt.data import formats, sources
from prefopt.errors import PrefoptError
from prefopt.files import write_text_atomic


def _key(default: Any = None, meaning: str = "", factory: Any = None):
    """A config key: its default (or `factory` for a mutable one) and its one-line meaning, which
    `describe` prints beside it."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": meaning})
    return field(default=default, metadata={"help": meaning})


@dataclass
class ModelConfig:
    name: str = _key("default", "hub id | local folder | path/to/file.gguf | default (embedded SmolLM2-135M)")
    revision: Optional[str] = _key(None, "hub revision (branch, tag or commit) of model.name; null: the default one")
    dtype: str = _key("float32", "weights dtype: float32 | bfloat16 | float16")
    attn_implementation: str = _key("sdpa", "attention kernel: sdpa | eager | flash_attention_2 | ... | org/repo")
    trust_remote_code: bool = _key(False, "run the Python code of the model's repo (only for repos you trust)")


@dataclass
class LoraConfig:
    enabled: bool = _key(False, "train a LoRA adapter; false: a full fine-tune")
    r: int = _key(16, "adapter rank")
    alpha: int = _key(32, "the adapter's update is scaled by alpha / r (peft's lora_alpha)")
    dropout: float = _key(0.0, "dropout on the adapter's input (peft's lora_dropout)")
    target_modules: Union[str, list] = _key("all-linear", "layers given an adapter: all-linear, or a list of names")
    merge: bool = _key(False, "also save a merged full model in OUT/merged")
    args: dict = _key(meaning="other peft.LoraConfig options (use_dora, ...), given as lora keys", factory=dict)

    def peft_kwargs(self) -> dict:
        """The keyword arguments of `peft.LoraConfig` for this adapter: r, lora_alpha, lora_dropout,
        target_modules, every peft option of `args`, and task_type CAUSAL_LM."""
        return {
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.target_modules,
            **self.args,
            "task_type": "CAUSAL_LM",
        }


@dataclass
class DataConfig:
    train: Optional[str] = _key(None, "training data: a file (.jsonl/.json/.parquet), save_to_disk folder or hub id")
    eval: Optional[str] = _key(None, "evaluation data, a source like data.train (`:split` suffix for its split)")
    eval_split: Optional[str] = _key(
        None, "split evaluation reads; null: data.eval's `:split`, else a test/eval/validation split, never `split`"
    )
    split: str = _key("train", "split of a hub dataset or a DatasetDict folder that training reads")
    eval_fraction: float = _key(0.0, "hold out this fraction of `train` for evaluation (without data.eval)")
    limit: Optional[int] = _key(None, "use only the first N records; null: all")
    max_length: int = _key(512, "prompt + longest response, in tokens")
    max_prompt_length: int = _key(256, "when a pair exceeds max_length, its prompt is cut to this first")
    truncation: str = _key("keep_end", "keep_end: the prompt keeps its end, responses their start | drop: the pair")
    chat_template: str = _key("auto", "auto: template for conversational data, raw text for strings | always | never")
    shape: str = _key(
        "auto", "auto (from the fields) | standard | conversational | implicit | sharegpt | unpaired | ratings"
    )
    fields: dict = _key(meaning="rename the file's fields: {prompt: instruction, ...}", factory=dict)
    ratings_rule: str = _key("best_vs_worst", "rated completions -> pairs: best_vs_worst | best_vs_random | all_pairs")
    ratings_min_gap: float = _key(0.0, "a rated pair needs score(chosen) - score(rejected) > this")
    min_score_gap: Optional[float] = _key(None, "skip pairs whose score_chosen - score_rejected <= this; null: off")
    user_marker: str = _key("\n\nHuman:", "user turn marker of implicit-prompt string transcripts (HH-RLHF)")
    assistant_marker: str = _key("\n\nAssistant:", "assistant turn marker of implicit-prompt string transcripts")
    on_bad_record: str = _key("error", "error: stop at the first unusable record | skip: skip it, counted")


@dataclass
class LossConfig:
    """The loss and its hyperparameters. A key left unset (null) takes the chosen loss's default;
    the saved config records the values actually used. docs/losses.md lists them per loss.

    `name: combine` is a weighted sum of paired losses (MPO-style), `weights` maps each loss name
    to its weight ({sigmoid: 0.8, bco_pair: 0.2, sft: 1.0}); it takes the union of their
    hyperparameters. Modifiers of any paired loss: `ld_alpha` (LD-DPO: tokens beyond the pair's
    shared length count ld_alpha times; null = off) and `wpo` (WPO per-pair weights)."""

    name: str = _key("sigmoid", "a registered loss (sigmoid = DPO, ipo, simpo, kto, ...), an alias, or combine")
    weights: Optional[dict] = _key(None, "loss.name: combine only: {loss name: weight}")
    beta: Optional[float] = _key(None, "β: how far the policy may move from the reference (most losses)")
    label_smoothing: Optional[float] = _key(None, "cDPO / rDPO ε: the probability a label is flipped, in [0, 0.5)")
    gamma: Optional[float] = _key(None, "SimPO target margin γ")
    alpha: Optional[float] = _key(None, "CPO weight of the NLL of chosen responses")
    orpo_lambda: Optional[float] = _key(None, "ORPO weight λ of the odds-ratio term")
    desirable_weight: Optional[float] = _key(None, "KTO λ_D: weight of desirable completions")
    undesirable_weight: Optional[float] = _key(None, "KTO λ_U: weight of undesirable completions")
    ipo_normalize: Optional[bool] = _key(None, "IPO: divide each log-ratio by its response's length, not sum")
    f_divergence: Optional[str] = _key(None, "f-DPO divergence: reverse_kl | forward_kl | js | alpha")
    f_alpha: Optional[float] = _key(None, "f-DPO α of the alpha divergence (TRL's coefficient is 1 - α)")
    ld_alpha: Optional[float] = _key(None, "LD-DPO modifier, in [0, 1]: weight of tokens beyond the shared length")
    wpo: bool = _key(False, "WPO modifier: per-pair weights from the policy's own probabilities")
    wpo_clamp: Optional[float] = _key(1.0, "WPO weights capped at this (null: uncapped, as in TRL)")
    rpo_alpha: Optional[float] = _key(None, "RPO: weight of the NLL of chosen responses added to the loss")
    discopop_tau: Optional[float] = _key(None, "DiscoPOP temperature τ")
    dpop_lambda: Optional[float] = _key(None, "DPO-Positive λ: penalty once chosen falls below the reference")
    beta_dpo_alpha: Optional[float] = _key(None, "β-DPO α: how far each batch's β follows its mean margin")
    beta_dpo_rho: Optional[float] = _key(None, "β-DPO ρ, in (0, 1]: the fraction of each batch's pairs kept")
    tr_alpha: Optional[float] = _key(None, "TR-DPO α, in (0, 1]: the policy's weight in each reference update")
    tr_tau: Optional[int] = _key(None, "TR-DPO τ: optimizer steps between reference updates")
    alphapo_alpha: Optional[float] = _key(
        None, "AlphaPO α: the reward's shape, 0 = SimPO (TRL CPOConfig's alpha; loss.alpha is CPO's)"
    )


@dataclass
class ReferenceConfig:
    precompute: Optional[bool] = _key(
        None,
        "compute reference log-probs once before training, cached on disk; null: true, except for a loss "
        "whose reference moves during training (tr_dpo)",
    )
    cache_dir: Optional[str] = _key(None, "where they are cached; null: the prefopt cache folder")


@dataclass
class TrainConfig:
    output_dir: str = _key("runs/prefopt", "the run's folder: checkpoints, metrics, the final model, prefopt.yaml")
    epochs: float = _key(1.0, "passes over the training data")
    max_steps: int = _key(-1, "optimizer steps; -1: as many as `epochs` take")
    batch_size: int = _key(4, "pairs per device per step")
    grad_accum: int = _key(1, "steps whose gradients are summed before each optimizer step")
    lr: float = _key(5e-6, "peak learning rate")
    scheduler: str = _key("linear", "a transformers SchedulerType (some need train.lr_scheduler_kwargs)")
    warmup_ratio: float = _key(0.1, "fraction of the steps the learning rate warms up for")
    weight_decay: float = _key(0.0, "AdamW weight decay")
    max_grad_norm: float = _key(1.0, "clip the gradient norm to this; 0: no clipping")
    seed: int = _key(42, "seed of the data order, the eval split and the initialisation")
    bf16: Union[bool, str] = _key("auto", "bf16 autocast: true | false | auto (where the hardware has it)")
    # true: recompute each decoder layer in the backward (TRL's default too; SmolLM2-135M on CPU: peak
    # RSS full 4.1 -> 3.3 GB, LoRA 3.1 -> 1.8 GB, for ~10-25 % more time per step) | mlp: only each
    # layer's MLP | false: keep every activation (fastest)
    gradient_checkpointing: Union[bool, str] = _key(
        True, "recompute activations in the backward: true (whole layers) | mlp (only MLPs) | false"
    )
    prefix_sharing: bool = _key(True, "prompt computed once per pair: [prompt | chosen | rejected]")
    lm_head_chunk: int = _key(1024, "tokens per lm-head chunk; 0: unchunked")
    attention: str = _key(
        "auto",
        "segments: each response attends to its prompt and itself by plain causal SDPA calls, no T×T "
        "mask (sdpa models; other attention implementations use dense) | dense: one T×T mask per row | "
        "auto: dense for short rows, segments for long ones (from prefopt.modeling.logprobs.SEGMENTS_FROM tokens)",
    )
    logging_steps: int = _key(1, "log metrics every N steps")
    save_steps: int = _key(500, "checkpoint every N steps (what --resume continues from); 0: none")
    save_total_limit: int = _key(2, "keep the newest N checkpoints; 0: keep all")
    eval_steps: int = _key(0, "evaluate every N steps; 0: only at the end (when there is eval data)")
    report_to: Union[str, list] = _key(
        "none", "besides OUT/metrics.jsonl: none | tensorboard | trackio | wandb | mlflow | ... (a list for several)"
    )
    num_workers: int = _key(0, "data loader worker processes; 0: load in the main process")
    progress: bool = _key(True, "show progress bars")
    push_to_hub: bool = _key(False, "push the finished model to the Hub repo train.hub_model_id")
    hub_model_id: Optional[str] = _key(None, "owner/name of the Hub model repo push_to_hub pushes to")
    hub_private: bool = _key(False, "create that repo private")
    args: dict = _key(meaning="other transformers.TrainingArguments fields, given as train keys", factory=dict)


@dataclass
class GRPOConfig:
    """`prefopt grpo` only (`prefopt train` ignores it): where the prompts come from, the reward,
    and the GRPO objective, with the names of TRL's GRPOConfig (docs/grpo.md). train.batch_size
    counts prompts here: each micro-batch samples batch_size × num_generations completions."""

    prompts: str = _key(
        "code", "code (the code task's train problems) | code:PROBLEMS.jsonl | sentiment | a .txt/.jsonl prompts file"
    )
    reward: str = _key(
        "tests", "tests | tests_binary | vader | length | regex:... | keywords:... | module:fn (docs/evaluation.md)"
    )
    limit: Optional[int] = _key(None, "use only the first N prompts; null: all")
    num_generations: int = _key(4, "G: completions sampled per prompt from the current policy (a group)")
    max_completion_length: int = _key(160, "tokens per completion, at most")
    beta: float = _key(0.0, "weight of the KL to the reference (k3 estimator per token); 0: no reference")
    epsilon: float = _key(0.2, "the ratio is clipped to [1 - epsilon, 1 + epsilon_high]")
    epsilon_high: Optional[float] = _key(None, "upper clip (DAPO's clip-higher); null: epsilon")
    loss_type: str = _key("dapo", "how token losses are averaged: grpo | bnpo | dapo | dr_grpo")
    scale_rewards: Union[bool, str] = _key(
        "group", "advantages divided by the reward std of the group | batch | none (Dr. GRPO); true/false: group/none"
    )
    importance_sampling_level: str = _key("token", "the ratio per token | sequence (GSPO)")
    num_iterations: int = _key(1, "optimizer steps on each sampled batch; > 1 clips the ratio to the sampling policy")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)

    def resolved(self) -> dict:
        """The config as nested dicts, every key with its value (what is saved beside the model)."""
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_SECTION_CLASSES = typing.get_type_hints(Config)  # section -> its dataclass

# Every value a message shows goes through `show`: a bounded repr, so that a huge or deeply shared
# value (a YAML alias bomb is a few lines that expand to billions of items) is shown in a few words.
_SHOW = reprlib.Repr()
_SHOW.maxlevel = 3
_SHOW.maxlist = _SHOW.maxtuple = _SHOW.maxset = _SHOW.maxfrozenset = _SHOW.maxdict = 6
_SHOW.maxstring = 80
_SHOW.maxlong = 40
_SHOW.maxother = 80
_SHOW_MAX = 160  # characters in all


def show(value: Any) -> str:
    """`value` as a message shows it: its repr, cut short (nesting, items, characters)."""
    try:
        text = _SHOW.repr(value)
    except Exception:  # e.g. an int too long for str() (Python's 4300-digit limit)
        return f"<{type(value).__name__}>"
    return text if len(text) <= _SHOW_MAX else text[: _SHOW_MAX - 3] + "..."


def _name(section: str, key: Any) -> str:
    """`section.key` for a message, cut short if the key is long."""
    name = f"{section}.{key}" if section else str(key)
    return name if len(name) <= 100 else name[:97] + "..."


def _float_ok(value: Any) -> float:
    """`value` as a finite float, or ValueError saying what was expected."""
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):  # YAML 1.1 reads 5e-6 as a string
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None:
        raise ValueError(f"a number, found {show(value)}")
    try:
        number = float(number)
    except OverflowError:  # an int beyond the float range
        number = math.inf
    if not math.isfinite(number):  # .nan, .inf, -.inf, "nan", "inf", 1e999
        raise ValueError(f"a finite number, found {show(value)}")
    return number


def _str_ok(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"a string, found {show(value)}")


# annotation -> (does `value` have it, what the message says it must be)
_PLAIN_TYPES = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    list: (lambda v: isinstance(v, list), "a list"),
    dict: (lambda v: isinstance(v, dict), "a mapping"),
}


def _union_ok(value: Any, annotation: Any) -> Any:
    if value is None and type(None) in typing.get_args(annotation):
        return None
    expected = []
    for arg in typing.get_args(annotation):
        if arg is type(None):
            continue
        try:
            return _type_ok(value, arg)
        except ValueError as e:  # "<what>, found <value>": name the value once
            expected.append(str(e).rsplit(", found ", 1)[0])
    raise ValueError(f"{' or '.join(expected)}, found {show(value)}")


def _type_ok(value: Any, annotation: Any) -> Any:
    """Coerce `value` to the annotated type, or raise ValueError saying what was expected. A float
    must be finite: NaN and ±inf are refused here, once for every float key."""
    if isinstance(annotation, str):
        annotation = eval(annotation, globals())  # annotations are strings (from __future__)
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return _union_ok(value, annotation)
    if annotation is float:
        return _float_ok(value)
    if annotation is str:
        return _str_ok(value)
    if annotation in _PLAIN_TYPES:
        has_type, what = _PLAIN_TYPES[annotation]
        if has_type(value):
            return value
        raise ValueError(f"{what}, found {show(value)}")
    return value


def _section_types(section_cls) -> dict:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _check_top_level(raw: Any, source: str) -> dict:
    """`raw` (a whole config) if it is a mapping of sections ({} for None), else a PrefoptError naming `source`."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise PrefoptError(
            f"{source}: expected a mapping of sections ({', '.join(SECTIONS)}), found {type(raw).__name__} {show(raw)}."
        )
    return raw


def from_dict(raw: dict, source: str = "config") -> Config:
    """Build a Config from nested dicts; unknown sections/keys and wrong types are errors."""
    raw = _check_top_level(raw, source)
    cfg = Config()
    for section, values in raw.items():
        if section not in SECTIONS:
            raise PrefoptError(
                f"{source}: unknown section '{_name('', section)}'. Known sections: {', '.join(SECTIONS)}."
            )
        if values is None:
            continue
        if not isinstance(values, dict):
            raise PrefoptError(f"{source}: section '{section}' must be a mapping of keys, found {show(values)}.")
        if section == "loss":
            values = _trl_sync(values, source)
        set_keys(getattr(cfg, section), values, source, section)
    complete(cfg, source)
    return cfg


def set_keys(obj, values: dict, source: str, section: str = "") -> None:
    """Set `values` on the dataclass `obj`, each coerced to its field's type; an unknown key or a
    wrong type is an error naming `section.key` (or `key` without a section). In a config section a
    TRL/transformers/peft name (ALIASES) sets its prefopt key, and train/lora keep any other field of
    TrainingArguments / peft.LoraConfig in their `args` (PASSTHROUGH)."""
    types_ = _section_types(type(obj))
    passthrough = section in PASSTHROUGH and "args" in types_
    args: dict = {}
    for given, key, value in _entries(values, section, source):
        from_args = isinstance(given, str) and given.startswith("args.")
        if key in types_ and not from_args:
            _set_key(obj, given, key, value, types_[key], section, source)
        elif passthrough:
            args[key] = _passthrough_value(section, given, key, value, types_, source)
        else:
            raise _unknown_key(section, key, types_, source, given)
    if passthrough and (args or "args" in values):
        obj.args = args


def _set_key(obj, given: Any, key: str, value: Any, annotation: Any, section: str, source: str) -> None:
    """obj.key = `value` coerced to `annotation`, or a PrefoptError naming the key as given."""
    try:
        setattr(obj, key, _type_ok(value, annotation))
    except ValueError as e:
        note = _ALIAS_NOTES.get(given) if given != key else None
        raise PrefoptError(f"{source}: '{_name(section, given)}' must be {e}{f' ({note})' if note else ''}.") from None


# --- Names of TRL, transformers and peft -------------------------------------------------------------
#
# The rule: a transformers/TRL/peft name is an alias of exactly one prefopt key of the same section; the
# resolved config (saved beside the model) uses prefopt's names; giving an alias and its key together
# is an error naming both. Besides, `train:` passes any other transformers.TrainingArguments field
# through to TrainingArguments, and `lora:` any other peft.LoraConfig field to peft (both kept in the
# section's `args`), except the fields prefopt sets itself (_MANAGED), which are refused naming the key
# to use instead.

# section -> {TRL / transformers / peft name: the prefopt key it is an alias of}
ALIASES: dict[str, dict[str, str]] = {
    "model": {"model_name_or_path": "name", "model_revision": "revision", "torch_dtype": "dtype"},
    "lora": {
        "lora_r": "r",
        "lora_alpha": "alpha",
        "lora_dropout": "dropout",
        "lora_target_modules": "target_modules",
        "use_peft": "enabled",
        "lora_modules_to_save": "modules_to_save",  # TRL's ModelConfig name of peft's modules_to_save
    },
    "data": {"dataset_name": "train", "dataset_train_split": "split", "dataset_test_split": "eval_split"},
    "loss": {
        "loss_type": "name",
        "use_weighting": "wpo",
        "ref_model_mixup_alpha": "tr_alpha",  # TR-DPO (sync_ref_model: true is loss.name: tr_dpo, see _trl_sync)
        "ref_model_sync_steps": "tr_tau",
    },
    "reference": {"precompute_ref_log_probs": "precompute"},
    "train": {
        "learning_rate": "lr",
        "per_device_train_batch_size": "batch_size",
        "gradient_accumulation_steps": "grad_accum",
        "num_train_epochs": "epochs",
        "lr_scheduler_type": "scheduler",
        "dataloader_num_workers": "num_workers",
        "activation_checkpointing": "gradient_checkpointing",
        "hub_private_repo": "hub_private",
    },
}

# section -> (what its other keys are passed to, that class)
PASSTHROUGH = {"train": ("transformers.TrainingArguments", TrainingArguments), "lora": ("peft.LoraConfig", PeftLora)}

_TOKEN = "prefopt reads no token from its config: log in with `hf auth login` or set HF_TOKEN"
_HUB = "prefopt pushes the finished model once, itself (train.push_to_hub, train.hub_model_id, train.hub_private)"
# section -> {a field of its PASSTHROUGH class that prefopt sets itself: what to write instead}
_MANAGED: dict[str, dict[str, str]] = {
    "train": {
        "per_device_eval_batch_size": "prefopt evaluates with train.batch_size",
        "warmup_steps": "set train.warmup_ratio (the warmup as a fraction of the steps)",
        "logging_strategy": "prefopt logs every train.logging_steps steps",
        "save_strategy": "set train.save_steps (0: no checkpoints)",
        "eval_strategy": "set train.eval_steps (0: evaluate only at the end)",
        "disable_tqdm": "set train.progress (false: no progress bars)",
        "use_cpu": "prefopt uses the GPU when there is one (CUDA_VISIBLE_DEVICES= to train on the CPU)",
        "fp16": "prefopt's precision is train.bf16 (autocast) and model.dtype (the weights)",
        "remove_unused_columns": "prefopt's collator needs every column",
        "label_names": "prefopt's trainer computes its own loss (loss:)",
        "label_smoothing_factor": (
            "it smooths the language-model loss, which prefopt's losses do not use; see loss.label_smoothing"
        ),
        "hub_token": _TOKEN,
        "hub_strategy": _HUB,
        "hub_always_push": _HUB,
        "hub_revision": _HUB,
        "resume_from_checkpoint": "continue a run with `prefopt train CONFIG --resume`",
    },
    "lora": {
        "task_type": "prefopt trains causal LMs: it sets CAUSAL_LM",
        "peft_type": "prefopt's adapter is LoRA",
        "inference_mode": "prefopt trains the adapter",
        "base_model_name_or_path": "the base model is model.name",
        "revision": "the base model's revision is model.revision",
        "auto_mapping": "peft sets it",
        "peft_version": "peft sets it",
    },
}

# TRL / transformers names that are no prefopt key (in any section): what to write instead
_TRL_NAMES = {
    "truncation_mode": "TRL's; prefopt's is data.truncation: keep_end (the prompt keeps its end, the responses "
    "their start: TRL < 1.0's keep_end) or drop (the pair); TRL's keep_start has no equivalent",
    "max_completion_length": "TRL's (before 1.0); prefopt cuts responses to data.max_length with the prompt",
    "loss_weights": "TRL's list beside loss_type; prefopt's is loss.weights, a mapping {loss name: weight} with "
    "loss.name: combine",
    "f_divergence_type": "TRL's; prefopt's is loss.f_divergence: reverse_kl, forward_kl, js (TRL's js_divergence) "
    "or alpha (TRL's alpha_divergence)",
    "f_alpha_divergence_coef": "TRL's, which is 1 - prefopt's loss.f_alpha (the paper's α); give loss.f_alpha",
    "precompute_ref_batch_size": "TRL's; prefopt precomputes reference log-probs in batches of 2 x train.batch_size",
    "model_init_kwargs": "TRL's; prefopt's are model.dtype, model.attn_implementation, model.revision and "
    "model.trust_remote_code",
    "reference_free": "TRL's (before 1.0); choose a reference-free loss: loss.name: sigmoid_ref_free, simpo, ...",
    "sync_ref_model": "TRL's TR-DPO switch, a key of loss: (sync_ref_model: true is loss.name: tr_dpo)",
    "lora_task_type": "TRL's; prefopt trains causal LMs (CAUSAL_LM)",
    "evaluation_strategy": "transformers' old name of eval_strategy; set train.eval_steps",
    "overwrite_output_dir": "transformers' old option; use `prefopt train CONFIG --overwrite`",
    **dict.fromkeys(
        (
            "padding_free",
            "pad_to_multiple_of",
            "dataset_num_proc",
            "activation_offloading",
            "router_aux_loss_coef",
            "disable_dropout",
            "pad_token",
        ),
        "a TRL DPOConfig option that prefopt does not have",
    ),
}
SYNC_REF_MODEL = "sync_ref_model"  # TRL DPOConfig's TR-DPO switch; prefopt's TR-DPO is the loss tr_dpo


def _trl_sync(values: dict, source: str) -> dict:
    """The loss section `values` with TRL's `sync_ref_model` read: true makes DPO (sigmoid, TRL's
    default loss_type) TR-DPO, loss.name tr_dpo (DPO with a moving reference); false, TRL's
    default, changes nothing. A PrefoptError for a value that is not true or false, for true with
    another loss, and for false with tr_dpo."""
    if SYNC_REF_MODEL not in values:
        return values
    values = dict(values)
    sync = values.pop(SYNC_REF_MODEL)
    name_key = next((k for k in ("name", "loss_type") if k in values), "name")
    name = values.get(name_key, LossConfig.name)
    loss = losses.ALIASES.get(name, name) if isinstance(name, str) else name
    if not isinstance(sync, bool):
        raise PrefoptError(f"{source}: 'loss.{SYNC_REF_MODEL}' must be true or false, found {show(sync)}.")
    if not sync and loss == "tr_dpo":
        raise PrefoptError(
            f"{source}: 'loss.{SYNC_REF_MODEL}' is false, but loss.name is tr_dpo, whose reference moves; give one."
        )
    if sync and loss not in ("sigmoid", "tr_dpo"):
        raise PrefoptError(
            f"{source}: 'loss.{SYNC_REF_MODEL}' is true (TRL's TR-DPO), but loss.name is {show(name)}: prefopt's "
            "moving reference is the loss tr_dpo, DPO's sigmoid loss with the reference moved every loss.tr_tau "
            "steps (TRL's ref_model_sync_steps) by loss.tr_alpha (ref_model_mixup_alpha); set loss.name: tr_dpo, "
            f"or remove {SYNC_REF_MODEL}."
        )
    if sync:
        values[name_key] = "tr_dpo"
    return values


# notes added to a wrong value given under an alias: alias -> note
_ALIAS_NOTES = {"loss_type": "several losses: loss.name: combine with loss.weights, e.g. {sigmoid: 0.8, sft: 1.0}"}


def _alias_of(section: str, key: Any) -> Any:
    """The prefopt key (or pass-through name) that `key` stands for in `section`: its alias target, else itself."""
    return ALIASES.get(section, {}).get(key, key) if isinstance(key, str) else key


@functools.cache
def _passthrough_fields(section: str) -> dict[str, Any]:
    """{field name: annotation} of the class `section`'s other keys are passed to."""
    cls = PASSTHROUGH[section][1]
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}


def passthrough_names(section: str) -> list[str]:
    """The names `section` (train or lora) passes through to transformers / peft: the fields of that
    class that are no prefopt key or alias and that prefopt does not set itself."""
    if section not in PASSTHROUGH:
        return []
    own = set(_section_types(_SECTION_CLASSES[section])) | set(ALIASES.get(section, {}))
    return [n for n in _passthrough_fields(section) if n not in own and n not in _MANAGED.get(section, {})]


def _enum_choices(annotation: Any) -> Optional[list]:
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [e.value for e in annotation]
    return None


def _literal_ok(value: Any, choices: tuple) -> bool:
    """Whether `value` is one of a Literal's `choices` (a choice like 'pissa_niter_[number of iters]' is a prefix)."""
    if value in choices:
        return True
    prefixes = [c.split("[", 1)[0] for c in choices if isinstance(c, str) and "[" in c]
    return isinstance(value, str) and any(value.startswith(p) for p in prefixes)


def _arg_union_ok(value: Any, annotation: Any) -> Any:
    options = typing.get_args(annotation)
    if value is None and type(None) in options:
        return None
    options = [a for a in options if a is not type(None)]
    if any(_enum_choices(a) for a in options):  # `OptimizerNames | str`: the library converts the str to the enum
        options = [a for a in options if a is not str]
    if len(options) == 1:
        return _arg_ok(value, options[0])
    expected = []
    for option in options:
        try:
            return _arg_ok(value, option)
        except ValueError as e:
            expected.append(str(e).rsplit(", found ", 1)[0])
    raise ValueError(f"{' or '.join(expected)}, found {show(value)}")


def _arg_ok(value: Any, annotation: Any) -> Any:
    """`value` for a pass-through field annotated `annotation` (by transformers or peft), coerced like a
    prefopt key where the annotation is a plain type, checked against an Enum's or Literal's choices;
    ValueError saying what was expected (a class YAML cannot give is one)."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        return _arg_union_ok(value, annotation)
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        if _literal_ok(value, choices):
            return value
        raise ValueError(f"one of {', '.join(map(str, choices))}, found {show(value)}")
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ValueError(f"a list, found {show(value)}")
        item = typing.get_args(annotation)
        plain = origin is list and len(item) == 1 and (item[0] in _PLAIN_TYPES or item[0] in (str, float))
        return [_arg_ok(v, item[0]) for v in value] if plain else value
    if origin is dict:
        return _type_ok(value, dict)
    choices = _enum_choices(annotation)
    if choices is not None:
        if value in choices:
            return value
        raise ValueError(f"one of {', '.join(map(str, choices))}, found {show(value)}{_did_you_mean(value, choices)}")
    if annotation in (bool, int, float, str, list, dict):
        return _type_ok(value, annotation)
    raise ValueError(f"a {getattr(annotation, '__name__', annotation)} (a Python object, which a config cannot give)")


def _home(section: str, key: Any) -> Optional[str]:
    """`other.key` when `key`, unknown in `section`, is a key, alias or pass-through name of another section."""
    if not section or not isinstance(key, str):
        return None
    for other, cls in _SECTION_CLASSES.items():
        known = set(_section_types(cls)) | set(ALIASES.get(other, {})) | set(passthrough_names(other))
        if other != section and key in known:
            target = _alias_of(other, key)
            return f"{other}.{key}" + (f", prefopt's {other}.{target}" if target != key else "")
    return None


def _unknown_key(section: str, key: Any, types_: dict, source: str, given: Any = None) -> PrefoptError:
    """The error for `key` (given as `given`), which `section` (of a config; '' for the keys `types_` of another
    dataclass) does not know: what a TRL name is in prefopt, which section has the key, or the closest known
    name, and the known keys listed."""
    name = _name(section, key if given is None else given)
    if section in SECTIONS and key in _TRL_NAMES:
        return PrefoptError(f"{source}: unknown key '{name}': it is {_TRL_NAMES[key]}.")
    home = _home(section, key)
    if home:
        return PrefoptError(f"{source}: unknown key '{name}': it belongs under '{home.split('.')[0]}:' ({home}).")
    aliases = list(ALIASES.get(section, {}))
    hint = _did_you_mean(key, list(types_) + aliases + passthrough_names(section))
    known = f"Known keys of '{section}'" if section else "Known keys"
    also = f"; TRL/transformers/peft names: {', '.join(aliases)}" if aliases else ""
    if section in PASSTHROUGH:
        also += f"; and any other {PASSTHROUGH[section][0]} field (`prefopt config {section}` lists them)"
    return PrefoptError(f"{source}: unknown key '{name}'{hint}. {known}: {', '.join(types_)}{also}.")


def _entries(values: dict, section: str, source: str) -> list[tuple[str, Any, Any]]:
    """(the name as given, the prefopt key or pass-through name it stands for, value) of each of a section's
    `values`: aliases resolved, each entry of an `args` mapping taken as a key of the section (given as
    `args.NAME`). A key given twice (under an alias, or both as a key and in args) is an error naming both."""
    out: list[tuple[str, Any, Any]] = []
    seen: dict = {}
    for key, value in values.items():
        if key == "args" and section in PASSTHROUGH and isinstance(value, (dict, type(None))):
            items = [(f"args.{k}", _alias_of(section, k), v) for k, v in (value or {}).items()]
        else:
            items = [(key, _alias_of(section, key), value)]
        for given, target, item in items:
            if target in seen:
                raise PrefoptError(
                    f"{source}: '{_name(section, seen[target])}' and '{_name(section, given)}' both set "
                    f"{_name(section, target)}; give only one."
                )
            seen[target] = given
            out.append((given, target, item))
    return out


def _passthrough_value(section: str, given: str, key: Any, value: Any, types_: dict, source: str) -> Any:
    """`value` of the pass-through name `key` (given as `given`) of `section`, coerced to its field's type;
    a PrefoptError for a name that is unknown, prefopt's own key, or set by prefopt itself."""
    name = _name(section, given)
    if key in types_ or key in ALIASES.get(section, {}):  # e.g. train.args.lr
        raise PrefoptError(f"{source}: '{name}' is prefopt's own key: give it as {section}.{_alias_of(section, key)}.")
    if section in _MANAGED and key in _MANAGED[section]:
        raise PrefoptError(
            f"{source}: '{name}' is a {PASSTHROUGH[section][0]} field that prefopt sets itself: "
            f"{_MANAGED[section][key]}."
        )
    if section not in PASSTHROUGH or key not in _passthrough_fields(section):
        raise _unknown_key(section, key, types_, source, given)
    try:
        return _arg_ok(value, _passthrough_fields(section)[key])
    except ValueError as e:
        raise PrefoptError(f"{source}: '{name}' must be {e}.") from None


COMBINE = "combine"  # loss.name of a weighted sum of paired losses (with loss.weights)
LOSS_MODIFIERS = ("ld_alpha", "wpo", "wpo_clamp")  # LossConfig keys that modify any paired loss
_NOT_HYPERPARAMETERS = ("name", "weights") + LOSS_MODIFIERS


def _combine_parts(loss: LossConfig, source: str) -> list[tuple[str, float]]:
    """loss.weights as [(registered paired loss name, weight)], or a PrefoptError naming loss.weights."""

    def bad(msg):
        raise PrefoptError(f"{source}: 'loss.weights' {msg}")

    known = ", ".join(losses.names(paired=True))
    example = "e.g. {sigmoid: 0.8, bco_pair: 0.2, sft: 1.0}"
    w = loss.weights
    if not w:
        bad(
            f"must map each paired loss to its weight when loss.name is '{COMBINE}' ({example}); "
            f"paired losses: {known}."
        )
    if not isinstance(w, dict):
        bad(f"must be a mapping of loss name to weight ({example}), found {show(w)}.")
    parts: list[tuple[str, float]] = []
    for name, weight in w.items():
        key = losses.ALIASES.get(str(name), str(name))
        if key not in losses.REGISTRY:
            bad(f"names {show(name)}, which is not a known loss; paired losses: {known}.")
        if not losses.REGISTRY[key].paired:
            bad(f"names '{name}', an unpaired loss; only paired losses can be combined: {known}.")
        if key in (k for k, _ in parts):
            bad(f"names '{key}' twice (aliases count as their loss).")
        try:
            value = _type_ok(weight, float)
        except ValueError as e:
            bad(f"gives '{name}' a weight that is not a number: expected {e}.")
        if not value >= 0 or value == float("inf"):
            bad(f"gives '{name}' the weight {value}; weights must be finite and >= 0.")
        parts.append((key, value))
    return parts


def resolve_loss(loss: LossConfig, source: str = "config"):
    """The LossSpec that `loss` (a LossConfig) describes: a registered loss or alias, or for
    `name: combine` the weighted sum `losses.combine` builds from `loss.weights`. The one place
    where the config's loss name is looked up; a PrefoptError naming the key otherwise."""
    if loss.name == COMBINE:
        parts = _combine_parts(loss, source)
        try:
            return losses.combine(parts, name=f"{COMBINE}(" + " + ".join(f"{w:g}·{n}" for n, w in parts) + ")")
        except ValueError as e:  # parts that cannot be summed (different states or token subsets)
            raise PrefoptError(f"{source}: 'loss.weights' {e}") from None
    key = losses.ALIASES.get(loss.name, loss.name)
    if key not in losses.REGISTRY:
        raise PrefoptError(
            f"{source}: 'loss.name' is {show(loss.name)}; known losses: "
            f"{', '.join(sorted(losses.REGISTRY))}, or '{COMBINE}' with loss.weights."
        )
    return losses.REGISTRY[key]


# where metrics go besides OUT/metrics.jsonl: transformers' integrations, each needing its package
REPORT_TO = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "trackio": ("trackio",),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "comet_ml": ("comet_ml",),
    "clearml": ("clearml",),
    "dvclive": ("dvclive",),
    "swanlab": ("swanlab",),
    "neptune": ("neptune",),
    "codecarbon": ("codecarbon",),
}


def _check_report_to(value, source: str) -> None:
    names = [value] if isinstance(value, str) else list(value)
    for name in names:
        if name in ("none", "all"):
            continue
        if not isinstance(name, str) or name not in REPORT_TO:
            raise PrefoptError(
                f"{source}: 'train.report_to' has {show(name)}; expected none, all, or any of "
                f"{', '.join(REPORT_TO)} (a list for several)."
            )
        if not any(importlib.util.find_spec(m) for m in REPORT_TO[name]):
            raise PrefoptError(
                f"{source}: 'train.report_to' has '{name}', but its package is not installed: "
                f"pip install {REPORT_TO[name][0]}"
            )


def complete(cfg: Config, source: str = "config") -> None:
    """Fill in what `cfg` leaves to the loss, then validate it: the loss name canonical (aliases
    resolved), combine weights canonical, hyperparameters the loss does not take dropped (with a
    warning) and those left unset given the loss's defaults, so the saved config records the
    values actually used."""
    spec = resolve_loss(cfg.loss, source)
    loss = cfg.loss
    loss.name = spec.name if loss.name != COMBINE else COMBINE
    if loss.name == COMBINE:
        loss.weights = dict(_combine_parts(loss, source))  # canonical names, float weights
    for key in (f.name for f in dataclasses.fields(loss)):  # not asdict: it would copy loss.weights deeply
        if key not in _NOT_HYPERPARAMETERS and getattr(loss, key) is not None and key not in spec.hyperparameters:
            # e.g. a YAML made for DPO (beta) run with --loss.name orpo: said, dropped, not fatal
            logging.getLogger("prefopt").warning(
                "%s: loss.%s = %s is not used by loss '%s' (it takes: %s%s); ignored.",
                source,
                key,
                show(getattr(loss, key)),
                spec.name,
                ", ".join(spec.hyperparameters) or "none",
                f"; modifiers {', '.join(LOSS_MODIFIERS)}" if spec.paired else "",
            )
            setattr(loss, key, None)
    for key, default in spec.hyperparameters.items():
        if getattr(loss, key) is None:
            setattr(loss, key, default)
    if cfg.reference.precompute is None:  # left unset: precomputed, unless the reference moves
        cfg.reference.precompute = not spec.moving_reference
    if isinstance(cfg.grpo.scale_rewards, bool):  # TRL's older true/false
        cfg.grpo.scale_rewards = "group" if cfg.grpo.scale_rewards else "none"
    validate(cfg, source)


def moving_reference_precompute_error(loss_name: str, key: str, remedy: str) -> str:
    """The message for precomputed reference log-probs (`key`) asked for with loss `loss_name`,
    whose reference moves during training; `remedy` says what to write instead."""
    return (
        f"{key} is true, but loss '{loss_name}' moves its reference during training (every tr_tau optimizer "
        "steps the reference's weights move towards the policy's), so reference log-probs cannot be computed "
        f"before training; {remedy}."
    )


def token_subset_conflict_error(loss_name: str, token_subset: str, key: str, remedy: str) -> str:
    """The message for LD-DPO (`key`, its ld_alpha) asked for with loss `loss_name`, which scores
    its own token subset; `remedy` says what to write instead."""
    return (
        f"{key} (LD-DPO's shared-length prefix) and loss '{loss_name}', which scores its own token subset "
        f"({token_subset}), both choose the tokens the loss sees; {remedy}."
    )


def _bad(source: str, key: str, msg: str):
    raise PrefoptError(f"{source}: '{key}' {msg}")


def _did_you_mean(value: Any, choices: list[str]) -> str:
    """' (did you mean 'x'?)' for the choice closest to `value`, or ''."""
    close = difflib.get_close_matches(str(value).lower(), choices, n=1) if isinstance(value, str) else []
    return f" (did you mean '{close[0]}'?)" if close else ""


def _one_of(source: str, key: str, value: Any, choices: list[str]) -> None:
    """A PrefoptError naming `key` unless `value` is one of `choices` (listed, with the closest one)."""
    if value not in choices:
        _bad(source, key, f"must be one of {', '.join(choices)}, found {show(value)}{_did_you_mean(value, choices)}.")


def validate(cfg: Config, source: str = "config") -> None:
    """A PrefoptError naming the first key of `cfg` whose value is out of range or inconsistent
    with another; `cfg` is not changed."""
    _check_finite(cfg, source)
    _validate_loss(cfg.loss, source)
    _validate_reference(cfg, source)
    _validate_data(cfg.data, source)
    _validate_train(cfg.train, source)
    _validate_schedule(cfg.train, cfg.data, source)
    _validate_hub(cfg.train, source)
    _validate_model(cfg, source)
    _validate_passthrough(cfg, source)
    _validate_grpo(cfg.grpo, source)


def _validate_grpo(g: GRPOConfig, source: str) -> None:
    """The grpo section's values in range."""
    for key in ("max_completion_length", "num_iterations"):
        if getattr(g, key) < 1:
            _bad(source, f"grpo.{key}", f"must be >= 1, found {show(getattr(g, key))}.")
    if g.num_generations < 2:
        _bad(
            source, "grpo.num_generations", "must be >= 2: a group's advantages are relative to its other completions."
        )
    if g.limit is not None and g.limit < 1:
        _bad(source, "grpo.limit", f"must be >= 1 or null, found {show(g.limit)}.")
    if g.beta < 0:
        _bad(source, "grpo.beta", f"must be >= 0, found {show(g.beta)}.")
    if not 0 < g.epsilon < 1:
        _bad(source, "grpo.epsilon", f"must be in (0, 1), found {show(g.epsilon)}.")
    if g.epsilon_high is not None and g.epsilon_high <= 0:
        _bad(source, "grpo.epsilon_high", f"must be > 0 or null, found {show(g.epsilon_high)}.")
    _one_of(source, "grpo.loss_type", g.loss_type, list(grpo.LOSS_TYPES))
    _one_of(source, "grpo.scale_rewards", g.scale_rewards, list(grpo.SCALES))
    _one_of(source, "grpo.importance_sampling_level", g.importance_sampling_level, list(grpo.IMPORTANCE_LEVELS))
    for key in ("prompts", "reward"):
        if not getattr(g, key):
            _bad(source, f"grpo.{key}", "must not be empty (see `prefopt config grpo`).")


def _check_finite(cfg: Config, source: str) -> None:
    """Every float of `cfg` finite. Values read from YAML or the command line are checked as they are
    set (`_type_ok`); this pass also covers a Config built in code."""
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(cfg, section)):
            value = getattr(getattr(cfg, section), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                _bad(source, f"{section}.{f.name}", f"must be a finite number, found {show(value)}.")


# How this list was found: in transformers 5.x, PreTrainedModel.get_correct_attn_implementation
# (transformers/modeling_utils.py) accepts `["eager"] + ALL_ATTENTION_FUNCTIONS.valid_keys()` (sdpa,
# flex_attention, flash_attention_2/3/4, paged|eager, and any registered with AttentionInterface.register;
# read when validating, so those count), and _check_and_adjust_attn_implementation also takes a hub kernel
# repo, "org/repo[@revision][:function]" (the pattern of transformers.integrations.hub_kernels.is_kernel).
_HUB_KERNEL = re.compile(r"^[^/:]+/[^/:]+(?:@[^/:]+)?(?::[^/:]+)?$")


def attn_implementations() -> list[str]:
    """The model.attn_implementation names transformers accepts (besides hub kernels, "org/repo")."""
    return ["eager", *ALL_ATTENTION_FUNCTIONS.keys()]


def _validate_model(cfg: Config, source: str) -> None:
    if cfg.model.dtype not in ("float32", "bfloat16", "float16"):
        _bad(source, "model.dtype", f"must be float32, bfloat16 or float16, found {show(cfg.model.dtype)}.")
    attn = cfg.model.attn_implementation
    if not _HUB_KERNEL.match(attn):
        _one_of(source, "model.attn_implementation", attn, attn_implementations())
    lora = cfg.lora
    if lora.r < 1:
        _bad(source, "lora.r", f"must be >= 1, found {lora.r}.")
    if lora.alpha <= 0:
        _bad(source, "lora.alpha", f"must be > 0, found {lora.alpha}.")
    if not 0 <= lora.dropout < 1:
        _bad(source, "lora.dropout", f"must be in [0, 1), found {show(lora.dropout)}.")
    modules = lora.target_modules
    if isinstance(modules, list) and not (modules and all(isinstance(m, str) for m in modules)):
        _bad(source, "lora.target_modules", f"must be a string or a list of module names, found {show(modules)}.")


def _validate_loss(loss: LossConfig, source: str) -> None:
    spec = resolve_loss(loss, source)
    if loss.name != COMBINE and loss.weights is not None:
        _bad(source, "loss.weights", f"is only used with loss.name: {COMBINE} (loss.name is '{loss.name}').")
    for key, on in (("ld_alpha", loss.ld_alpha is not None), ("wpo", loss.wpo)):
        if on and not spec.paired:
            _bad(source, f"loss.{key}", f"modifies paired losses; loss '{spec.name}' is unpaired.")
    if loss.ld_alpha is not None and spec.token_subset is not None:
        message = token_subset_conflict_error(
            spec.name, spec.token_subset, "'loss.ld_alpha'", "remove loss.ld_alpha or choose another loss"
        )
        raise PrefoptError(f"{source}: {message}")
    if loss.ld_alpha is not None and not 0 <= loss.ld_alpha <= 1:
        _bad(
            source, "loss.ld_alpha", f"must be in [0, 1] (1 = plain, no length desensitisation), found {loss.ld_alpha}."
        )
    if loss.wpo and not spec.per_pair:
        _bad(
            source,
            "loss.wpo",
            f"weights each pair's loss, but '{spec.name}' returns losses of sorted order "
            "statistics, not of pairs; use another loss or wpo: false.",
        )
    if loss.wpo_clamp is not None and not loss.wpo_clamp > 0:
        _bad(source, "loss.wpo_clamp", f"must be > 0 (or null: uncapped), found {loss.wpo_clamp}.")
    if loss.beta is not None and loss.beta <= 0:
        _bad(source, "loss.beta", f"must be > 0, found {loss.beta}.")
    for key in ("tr_alpha", "beta_dpo_rho"):
        if getattr(loss, key) is not None and not 0 < getattr(loss, key) <= 1:
            _bad(source, f"loss.{key}", f"must be in (0, 1], found {getattr(loss, key)}.")
    if loss.tr_tau is not None and loss.tr_tau < 1:
        _bad(source, "loss.tr_tau", f"must be >= 1 (optimizer steps between reference updates), found {loss.tr_tau}.")
    if loss.label_smoothing is not None and not 0 <= loss.label_smoothing < 0.5:
        _bad(source, "loss.label_smoothing", f"must be in [0, 0.5), found {loss.label_smoothing}.")


def _validate_reference(cfg: Config, source: str) -> None:
    """reference.precompute not true for a loss whose reference moves (TR-DPO)."""
    spec = resolve_loss(cfg.loss, source)
    if spec.moving_reference and cfg.reference.precompute:
        raise PrefoptError(
            f"{source}: "
            + moving_reference_precompute_error(
                spec.name,
                "'reference.precompute'",
                "set reference.precompute: false, or leave it out (for this loss it defaults to false)",
            )
        )


def _validate_data(data: DataConfig, source: str) -> None:
    if data.truncation not in ("keep_end", "drop"):
        _bad(source, "data.truncation", f"must be 'keep_end' or 'drop', found {show(data.truncation)}.")
    if data.chat_template not in ("auto", "always", "never"):
        _bad(source, "data.chat_template", f"must be auto, always or never, found {show(data.chat_template)}.")
    if data.max_prompt_length >= data.max_length:
        _bad(
            source,
            "data.max_prompt_length",
            f"({data.max_prompt_length}) must be below data.max_length ({data.max_length}).",
        )
    if data.limit is not None and data.limit < 1:
        _bad(source, "data.limit", f"must be >= 1 (or null for all records), found {data.limit}.")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in data.fields.items()):
        _bad(source, "data.fields", f"must map field names to field names, found {show(data.fields)}.")
    if data.min_score_gap is not None and data.min_score_gap < 0:
        _bad(source, "data.min_score_gap", f"must be >= 0 (or null: off), found {show(data.min_score_gap)}.")
    try:
        formats.options_from(data).validate()
    except PrefoptError as e:
        raise PrefoptError(f"{source}: {e}") from None
    if data.max_prompt_length < 1:
        _bad(source, "data.max_prompt_length", f"must be >= 1, found {data.max_prompt_length}.")
    if not 0 <= data.eval_fraction < 1:
        _bad(source, "data.eval_fraction", f"must be in [0, 1), found {data.eval_fraction}.")
    if data.eval_split is not None:
        _validate_eval_split(data, source)


_SPLIT = re.compile(r"^[\w.-]+$")  # a split name, as sources reads a `:split` suffix


def _validate_eval_split(data: DataConfig, source: str) -> None:
    """data.eval_split a split name that agrees with data.eval's `:split` suffix, and not the training split
    of data.train's source."""
    split = data.eval_split
    if not _SPLIT.match(split):
        _bad(source, "data.eval_split", f"must be a split name (letters, digits, _ . -), found {show(split)}.")
    eval_base, eval_named = sources.parse_source(data.eval) if data.eval else (None, None)
    if eval_named and eval_named != split:
        _bad(
            source,
            "data.eval_split",
            f"is {show(split)}, but data.eval ({data.eval}) names the split '{eval_named}'; give only one of them.",
        )
    train_base, train_named = sources.parse_source(data.train) if data.train else (None, None)
    if data.train and eval_base in (None, train_base) and split == (train_named or data.split):
        _bad(
            source,
            "data.eval_split",
            f"is {show(split)}, the split data.train trains on: evaluation would measure examples trained on; "
            "name another split (or set data.eval).",
        )


# train key -> (its smallest value, what that value means)
_TRAIN_MINIMUM = {
    "batch_size": (1, ""),
    "grad_accum": (1, ""),
    "logging_steps": (1, ""),
    "save_steps": (0, " (0 = off)"),
    "save_total_limit": (0, " (0 = keep all)"),
    "eval_steps": (0, " (0 = off)"),
    "num_workers": (0, " (0 = load data in the main process)"),
    "lm_head_chunk": (0, " (0 = unchunked)"),
    "max_grad_norm": (0, " (0 = no clipping)"),
}
_SEED_MAX = 2**32 - 1  # numpy's seed range, which transformers' set_seed seeds too


def _validate_train(train: TrainConfig, source: str) -> None:
    if train.gradient_checkpointing not in (True, False, "mlp"):
        _bad(
            source,
            "train.gradient_checkpointing",
            f"must be true (whole layers), mlp (only each layer's MLP) or "
            f"false, found {show(train.gradient_checkpointing)}.",
        )
    if train.bf16 not in (True, False, "auto"):
        _bad(source, "train.bf16", f"must be true, false or auto, found {show(train.bf16)}.")
    if train.attention not in ("auto", "segments", "dense"):
        _bad(source, "train.attention", f"must be auto, segments or dense, found {show(train.attention)}.")
    for key, (lowest, meaning) in _TRAIN_MINIMUM.items():
        if getattr(train, key) < lowest:
            _bad(source, f"train.{key}", f"must be >= {lowest}{meaning}, found {show(getattr(train, key))}.")
    if not 0 <= train.seed <= _SEED_MAX:
        _bad(source, "train.seed", f"must be in [0, {_SEED_MAX}], found {show(train.seed)}.")
    _check_report_to(train.report_to, source)


# transformers schedulers that need lr_scheduler_kwargs (-> what they need)
_SCHEDULER_KWARGS = {
    "cosine_with_min_lr": "min_lr or min_lr_rate, e.g. {min_lr_rate: 0.1}",
    "cosine_warmup_with_min_lr": "min_lr or min_lr_rate, e.g. {min_lr_rate: 0.1}",
    "warmup_stable_decay": "num_decay_steps, e.g. {num_decay_steps: 100}",
}
_SCHEDULER_ON_EVAL = ("reduce_lr_on_plateau", "greedy")  # they step on the eval loss


def _validate_schedule(train: TrainConfig, data: DataConfig, source: str) -> None:
    if not 0 <= train.warmup_ratio < 1:
        _bad(source, "train.warmup_ratio", f"must be in [0, 1), found {train.warmup_ratio}.")
    if train.epochs <= 0:
        _bad(source, "train.epochs", f"must be > 0, found {train.epochs}.")
    if train.max_steps != -1 and train.max_steps < 1:
        _bad(source, "train.max_steps", f"must be >= 1 (or -1: as many as train.epochs take), found {train.max_steps}.")
    if train.lr <= 0:
        _bad(source, "train.lr", f"must be > 0, found {train.lr}.")
    kwargs = "lr_scheduler_kwargs" in train.args
    usable = [s.value for s in SchedulerType if kwargs or s.value not in _SCHEDULER_KWARGS]
    if train.scheduler in _SCHEDULER_KWARGS and not kwargs:
        _bad(
            source,
            "train.scheduler",
            f"is '{train.scheduler}', which needs lr_scheduler_kwargs ({_SCHEDULER_KWARGS[train.scheduler]}): set "
            f"train.lr_scheduler_kwargs, or use one of {', '.join(usable)}.",
        )
    _one_of(source, "train.scheduler", train.scheduler, usable)
    if train.scheduler in _SCHEDULER_ON_EVAL and train.eval_steps < 1:
        _bad(
            source,
            "train.scheduler",
            f"is '{train.scheduler}', which steps on the eval loss: it needs train.eval_steps >= 1 (and eval data).",
        )
    if train.eval_steps > 0 and data.eval is None and data.eval_split is None and data.eval_fraction == 0:
        _bad(
            source,
            "train.eval_steps",
            f"is {train.eval_steps}, but there is no eval data: set data.eval, data.eval_split or "
            "data.eval_fraction (or eval_steps: 0).",
        )


def _validate_hub(train: TrainConfig, source: str) -> None:
    """train.hub_model_id set when train.push_to_hub, and a Hub model repo id, owner/name."""
    repo = train.hub_model_id
    if train.push_to_hub and repo is None:
        _bad(source, "train.hub_model_id", "is not set, but train.push_to_hub is true: give the repo, as owner/name.")
    if repo is None:
        return
    if repo.count("/") != 1:
        _bad(
            source,
            "train.hub_model_id",
            f"must look like owner/name (a user or organisation / a repo), found {show(repo)}.",
        )
    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        _bad(source, "train.hub_model_id", f"must look like owner/name, found {show(repo)}: {e}")


def _validate_passthrough(cfg: Config, source: str) -> None:
    """The keys of train.args and lora.args are fields of TrainingArguments / peft.LoraConfig that prefopt
    passes through, with values of their types; lora.args as peft checks it."""
    for section in PASSTHROUGH:
        obj = getattr(cfg, section)
        if not isinstance(obj.args, dict):
            _bad(source, f"{section}.args", f"must be a mapping, found {show(obj.args)}.")
        types_ = _section_types(type(obj))
        for key, value in obj.args.items():
            _passthrough_value(section, key, key, value, types_, source)
    if cfg.lora.args:
        try:
            with warnings.catch_warnings():  # peft warns again when the adapter is made
                warnings.simplefilter("ignore")
                PeftLora(**cfg.lora.peft_kwargs())
        except (ValueError, TypeError) as e:
            raise PrefoptError(_refused(source, "peft.LoraConfig", "lora", cfg.lora.args, e)) from None


def _refused(source: str, library: str, section: str, args: dict, e: BaseException) -> str:
    """The message for `library` refusing the pass-through keys `args` of `section`: those its message
    names (else all of them) with their values, and its message."""
    text = " ".join(str(e).split())
    named = [k for k in args if k in text] or list(args)
    keys = ", ".join(f"'{section}.{k}' = {show(args[k])}" for k in named)
    detail = text if len(text) <= 400 else text[:397] + "..."
    return f"{source}: {library} refused {keys}: {detail or type(e).__name__}"


def training_args_kwargs(cfg: Config) -> dict:
    """The keyword arguments `train:` passes through to transformers.TrainingArguments (cfg.train.args),
    beside those prefopt sets from its own keys; none of them is one of those."""
    return dict(cfg.train.args)


def check_training_args(cfg: Config, build: Callable[[], Any], source: str = "config") -> Any:
    """`build()`, the recipe's `TrainingArguments(..., **training_args_kwargs(cfg))`. When transformers
    refuses it (ValueError, ImportError) and cfg.train passes keys through, a PrefoptError naming them;
    without pass-through keys the error is prefopt's own and propagates unchanged."""
    try:
        return build()
    except (ValueError, ImportError) as e:
        if not cfg.train.args:
            raise
        raise PrefoptError(_refused(source, "transformers.TrainingArguments", "train", cfg.train.args, e)) from None


MAX_YAML_VALUES = 100_000  # a config has tens of values; more, once aliases are expanded, is an alias bomb


class _Refused(Exception):
    """A YAML document the config loader refuses, with the mark (line) where it was noticed."""

    def __init__(self, mark, message: str):
        super().__init__(message)
        self.line = mark.line + 1 if mark is not None else None


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, stricter. A key given twice in one mapping is an error (PyYAML keeps the
    last one silently). So is a document that refers to itself, or that holds more than
    MAX_YAML_VALUES values once its aliases are expanded: PyYAML builds "billion laughs" cheaply as
    shared references, but anything that walks it (a message showing it, a deep copy) would not end.
    An integer too long for Python to read is an error too, not a ValueError without a line."""

    def __init__(self, stream):
        super().__init__(stream)
        self._paths: dict[int, str] = {}  # id(mapping node) -> its dotted key path, for messages

    def compose_document(self):
        """SafeLoader's, then the document's size with aliases expanded checked (and key paths recorded)."""
        node = super().compose_document()
        if node is not None:
            self._expanded_size(node, "", {}, set())
        return node

    def _expanded_size(self, node, path: str, sizes: dict, open_: set) -> int:
        """How many values `node` holds once its aliases are expanded (each shared node counted once
        per reference, computed once); records each mapping's key path."""
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_:
            raise _Refused(node.start_mark, f"{_at(path)}refers to itself through a YAML alias.")
        open_.add(id(node))
        if isinstance(node, yaml.MappingNode):
            self._paths.setdefault(id(node), path)
            children = [(path, k) for k, _ in node.value]
            children += [(_key_path(path, k), v) for k, v in node.value]
        else:
            children = [(path, child) for child in node.value] if isinstance(node, yaml.SequenceNode) else []
        size = 1
        for child_path, child in children:
            size += self._expanded_size(child, child_path, sizes, open_)
            if size > MAX_YAML_VALUES:
                raise _Refused(
                    node.start_mark,
                    f"{_at(path)}expands to more than {MAX_YAML_VALUES} values through YAML aliases "
                    "(an alias bomb?); refused.",
                )
        open_.discard(id(node))
        sizes[id(node)] = size
        return size

    def construct_mapping(self, node, deep=False):
        """SafeLoader's, but a key given twice is an error naming its dotted path and both lines."""
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                try:
                    earlier = first.get(key)
                except TypeError:  # unhashable: SafeLoader says so
                    continue
                if earlier is not None:
                    path = _key_path(self._paths.get(id(node), ""), key_node)
                    raise _Refused(
                        key_node.start_mark,
                        f"'{path}' is given twice (first at line {earlier}); YAML would keep only the last.",
                    )
                first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        """SafeLoader's, but an integer too long for Python to read is refused with its line."""
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # more than Python's 4300 digits
            raise _Refused(
                node.start_mark, f"the integer {show(node.value)} has {len(node.value)} digits, too many to read."
            ) from None


ConfigLoader.add_constructor("tag:yaml.org,2002:int", ConfigLoader.construct_yaml_int)


def _key_path(path: str, key_node) -> str:
    key = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
    return _name(path, key)


def _at(path: str) -> str:
    return f"'{path}' " if path else "the document "


def _load_yaml(text: str) -> Any:
    """The one YAML document in `text`, read with ConfigLoader."""
    loader = ConfigLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_overrides(args: list[str]) -> dict:
    """`--section.key value` (or `--section.key=value`) pairs -> nested dict. Values are YAML."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise PrefoptError(f"command line: expected an override like --train.lr 1e-5, found {show(arg)}.")
        key = arg[2:]
        if "=" in key:
            key, text = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise PrefoptError(f"command line: '{_name('', arg)}' needs a value.")
            text = args[i + 1]
            i += 2
        section, _, name = key.partition(".")
        if not name or "." in name:
            raise PrefoptError(f"command line: '--{_name('', key)}' must have the form --section.key.")
        out.setdefault(section, {})[name] = _override_value(key, text)
    return out


def _override_value(key: str, text: str) -> Any:
    """The value of `--key text`: `text` read as YAML, or as it is where it is not YAML."""
    try:
        return _load_yaml(text)
    except _Refused as e:
        raise PrefoptError(f"command line: '--{_name('', key)}': {e}") from None
    except RecursionError:
        raise PrefoptError(f"command line: '--{_name('', key)}': the value is nested too deeply.") from None
    except yaml.YAMLError:
        return text


def merge(base: dict, over: dict) -> dict:
    """`over` (overrides) on `base` (a config file), section by section. A key of `base` that `over`
    gives under another name (an alias, or an entry of the section's args) is replaced too. A section
    of `base` that is not a mapping stays, so that from_dict names it."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (base or {}).items()}
    for section, values in over.items():
        if isinstance(out.get(section), dict) and isinstance(values, dict):
            _drop_overridden(section, out[section], values)
            out[section].update(values)
        elif out.get(section) is None:
            out[section] = values
    return out


def _drop_overridden(section: str, base: dict, over: dict) -> None:
    """Remove from `base` (a copy of a section) the keys `over` gives under another name."""
    over_args = over.get("args") if isinstance(over.get("args"), dict) else {}
    given = {_alias_of(section, k) for k in [*over, *over_args]}
    for key in [k for k in base if k not in over and _alias_of(section, k) in given]:
        del base[key]
    if isinstance(base.get("args"), dict) and "args" not in over:
        base["args"] = {k: v for k, v in base["args"].items() if _alias_of(section, k) not in given}


def _yaml_problem(e: yaml.YAMLError, text: str) -> tuple[Optional[int], str]:
    """(line, what is wrong) of a PyYAML error reading `text`, for a message."""
    if isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow, at a character offset
        return text.count("\n", 0, e.position) + 1, f"the character #x{e.character:04x} is not allowed in YAML"
    mark = getattr(e, "problem_mark", None)
    return (mark.line + 1 if mark else None), str(getattr(e, "problem", None) or e)


def _read_text(path: str) -> str:
    """The UTF-8 text of config file `path`, or a PrefoptError naming it."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise PrefoptError(f"{path}: cannot read the config file ({e.strerror or e}).") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PrefoptError(
            f"{path}: not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} ({e.reason}); "
            "save the config as UTF-8."
        ) from None


def read_yaml(path: Optional[str]) -> tuple[Any, str]:
    """(the value in YAML file `path`, its name for messages); ({}, "command line") for no file, {} for
    an empty file. The value is normally a mapping: callers say what they expected otherwise. Every
    problem of the file (not found, not UTF-8, not YAML, a key twice, an alias bomb) is a PrefoptError
    naming it (and the line)."""
    if path is None:
        return {}, "command line"
    if not Path(path).is_file():
        raise PrefoptError(f"{path}: config file not found.")
    text = _read_text(path)
    try:
        raw = _load_yaml(text)
    except _Refused as e:
        where = f" line {e.line}:" if e.line else ""
        raise PrefoptError(f"{path}:{where} {e}") from None
    except yaml.YAMLError as e:
        line, problem = _yaml_problem(e, text)
        where = f" line {line}:" if line else ""
        raise PrefoptError(f"{path}:{where} not valid YAML ({problem}).") from None
    except RecursionError:
        raise PrefoptError(f"{path}: not valid YAML (nested too deeply).") from None
    return ({} if raw is None else raw), str(path)


def load(path: Optional[str], overrides: Optional[list[str]] = None) -> Config:
    """The Config of YAML file `path` (None: defaults) with `overrides` (`--section.key value` ...) on it."""
    raw, source = read_yaml(path)
    raw = _check_top_level(raw, source)
    cfg_raw = merge(raw, parse_overrides(overrides or []))
    return from_dict(cfg_raw, source)


def save(cfg: Config, path: Path) -> None:
    """Write `cfg`, fully resolved, as YAML to `path` (a temporary file renamed into place: a kill
    never leaves half a config)."""
    write_text_atomic(path, yaml.safe_dump(cfg.resolved(), sort_keys=False))


# --- One reference of every key ---------------------------------------------------------------------

_SECTION_HELP = {
    "model": "what to train (hub id, local folder, .gguf file, or `default`)",
    "lora": "LoRA adapter settings (enabled: false means a full fine-tune)",
    "data": "where the preference data is and how it is cut to length",
    "loss": "which loss of the family, and its hyperparameters; null: the chosen loss's default, which the "
    "saved config records (docs/losses.md lists them per loss)",
    "reference": "how reference log-probs are obtained",
    "train": "optimisation, precision, logging, output folder, Hub push",
    "grpo": "`prefopt grpo` only: the prompts, the reward and the GRPO objective (TRL GRPOConfig's names)",
}


def describe(section: Optional[str] = None) -> str:
    """Every key of the config (or of one `section`) as YAML to copy: each key with its default and a
    `# meaning` comment, each section with a note on the TRL/transformers/peft names it also takes.
    `config.load` reads the text back to the defaults."""
    if section is not None and section not in SECTIONS:
        raise PrefoptError(
            f"unknown section {show(section)}{_did_you_mean(section, list(SECTIONS))}. "
            f"Known sections: {', '.join(SECTIONS)}."
        )
    lines = [
        "# prefopt config: every key with its default. A config names only the keys it changes.",
        "# `prefopt config SECTION` shows one section.",
        *_comment(
            "From TRL: DPOConfig's beta, loss_type, label_smoothing, ld_alpha, discopop_tau, use_weighting, "
            "ref_model_mixup_alpha and ref_model_sync_steps are keys of loss: (sync_ref_model: true is "
            "loss.name: tr_dpo), max_length and max_prompt_length of data:, precompute_ref_log_probs of reference:, "
            "the TrainingArguments of train:, ModelConfig's lora_* and peft's options of lora:."
        ),
    ]
    for name in [section] if section else SECTIONS:
        lines += ["", *_describe_section(name)]
    return "\n".join(lines) + "\n"


def _describe_section(section: str) -> list[str]:
    """The lines of `describe` for `section`: its note, its name, and each key with default and meaning."""
    cls = _SECTION_CLASSES[section]
    defaults = cls()
    lines = _comment(f"{section}: {_SECTION_HELP[section]}.") + _comment(_names_note(section)) + [f"{section}:"]
    for f in dataclasses.fields(cls):
        lines.append(f"  {f.name}: {_yaml_value(getattr(defaults, f.name))}  # {f.metadata.get('help', '')}")
    return lines


def _names_note(section: str) -> str:
    """What `section` takes besides its keys: aliases, pass-through fields, and the fields prefopt sets."""
    parts = []
    if ALIASES.get(section):
        names = ", ".join(f"{alias}\0(=\0{key})" for alias, key in ALIASES[section].items())
        parts.append(f"Also accepted, TRL/transformers/peft names: {names}.")
    if section == "loss":
        parts.append(f"TRL's {SYNC_REF_MODEL}: true is loss.name: tr_dpo.")
    if section in PASSTHROUGH:
        fields = _passthrough_fields(section)
        names = ", ".join(n for n in passthrough_names(section) if _yaml_gives(fields[n]))
        parts.append(
            f"Any other {PASSTHROUGH[section][0]} field also works here and is passed to it (the saved config "
            f"keeps them in {section}.args): {names}."
        )
        parts.append(f"Set by prefopt itself, so refused here: {', '.join(_MANAGED[section])}.")
    return " ".join(parts)


def _comment(text: str) -> list[str]:
    """`text` as YAML comment lines of about 100 characters (never broken at a NUL, which is a space)."""
    return ["# " + line.replace("\0", " ") for line in textwrap.wrap(text, 98, break_on_hyphens=False)]


def _yaml_value(value: Any) -> str:
    """`value` as one line of YAML (a string with newlines double-quoted, with escapes)."""
    style = '"' if isinstance(value, str) and not value.isprintable() else None
    text = yaml.safe_dump(value, default_flow_style=True, default_style=style, width=10**6, allow_unicode=True)
    return text.removesuffix("\n...\n").strip()


def _yaml_gives(annotation: Any) -> bool:
    """Whether a YAML value can have `annotation`: not only a Python object (or null)."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return any(_yaml_gives(a) for a in typing.get_args(annotation) if a is not type(None))
    plain = annotation is Any or annotation in (bool, int, float, str, list, dict)
    return plain or typing.get_origin(annotation) is not None or _enum_choices(annotation) is not None
