"""One typed config: YAML file + dotted CLI overrides, validated with precise messages.

    model:     what to train (hub id, local folder, .gguf file, or `default`)
    lora:      LoRA adapter settings (enabled: false means a full fine-tune)
    data:      where the preference data is and how it is cut to length
    loss:      which loss of the family, and its hyperparameters
    reference: how reference log-probs are obtained
    train:     optimisation, precision, logging, output folder

Every key has a default, so a config names only what it changes. `resolved()` is the fully
resolved config that is saved beside the trained model.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from prefopt import losses
from prefopt.data import formats
from prefopt.errors import PrefoptError


@dataclass
class ModelConfig:
    name: str = "default"  # hub id | local folder | path/to/file.gguf | default (embedded SmolLM2-135M)
    revision: Optional[str] = None
    dtype: str = "float32"  # weights dtype: float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: Union[str, list] = "all-linear"
    merge: bool = False  # also save a merged full model in OUT/merged


@dataclass
class DataConfig:
    train: Optional[str] = None  # file (.jsonl/.json/.parquet), save_to_disk folder, or hub id
    eval: Optional[str] = None
    split: str = "train"  # split of a hub dataset or a DatasetDict folder
    eval_fraction: float = 0.0  # hold out this fraction of `train` for evaluation
    limit: Optional[int] = None  # use only the first N records
    max_length: int = 512  # prompt + longest response, in tokens
    max_prompt_length: int = 256  # when a pair exceeds max_length, its prompt is cut to this first
    truncation: str = "keep_end"  # prompt keeps its end, responses their start | "drop" the pair
    chat_template: str = "auto"  # auto: template for conversational data, raw text for strings
    shape: str = "auto"  # auto (recognised from the fields) | standard | conversational | implicit |
    #                      sharegpt | unpaired | ratings
    fields: dict = field(default_factory=dict)  # rename the file's fields: {prompt: instruction, ...}
    ratings_rule: str = "best_vs_worst"  # rated completions -> pairs: best_vs_worst | best_vs_random | all_pairs
    ratings_min_gap: float = 0.0  # a rated pair needs score(chosen) - score(rejected) > this
    user_marker: str = "\n\nHuman:"  # turn markers of implicit-prompt string transcripts (HH-RLHF)
    assistant_marker: str = "\n\nAssistant:"
    on_bad_record: str = "error"  # error: stop at the first unusable record | skip: skip it, counted


@dataclass
class LossConfig:
    """The loss and its hyperparameters. A key left unset (null) takes the chosen loss's default;
    the saved config records the values actually used. docs/losses.md lists them per loss.

    `name: combine` is a weighted sum of paired losses (MPO-style), `weights` maps each loss name
    to its weight ({sigmoid: 0.8, bco_pair: 0.2, sft: 1.0}); it takes the union of their
    hyperparameters. Modifiers of any paired loss: `ld_alpha` (LD-DPO: tokens beyond the pair's
    shared length count ld_alpha times; null = off) and `wpo` (WPO per-pair weights)."""

    name: str = "sigmoid"  # a registered loss, an alias, or `combine` (with `weights`)
    weights: Optional[dict] = None  # loss.name: combine only: {loss name: weight}
    beta: Optional[float] = None
    label_smoothing: Optional[float] = None  # cDPO / rDPO ε
    gamma: Optional[float] = None  # SimPO margin γ
    alpha: Optional[float] = None  # CPO NLL weight
    orpo_lambda: Optional[float] = None
    desirable_weight: Optional[float] = None  # KTO λ_D
    undesirable_weight: Optional[float] = None  # KTO λ_U
    ipo_normalize: Optional[bool] = None
    f_divergence: Optional[str] = None  # reverse_kl | forward_kl | js | alpha
    f_alpha: Optional[float] = None
    ld_alpha: Optional[float] = None  # LD-DPO modifier, in [0, 1]; null = off (1 = plain)
    wpo: bool = False  # WPO modifier: per-pair weights from the policy's own probabilities
    wpo_clamp: Optional[float] = 1.0  # WPO weights capped at this (null: uncapped, as in TRL)
    rpo_alpha: Optional[float] = None
    discopop_tau: Optional[float] = None


@dataclass
class ReferenceConfig:
    precompute: bool = True  # compute reference log-probs once before training, cached on disk
    cache_dir: Optional[str] = None  # default: the prefopt cache folder


@dataclass
class TrainConfig:
    output_dir: str = "runs/prefopt"
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 4  # pairs per device per step
    grad_accum: int = 1
    lr: float = 5e-6
    scheduler: str = "linear"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    bf16: Union[bool, str] = "auto"  # bf16 autocast: auto = where the hardware has it
    # true: recompute each decoder layer in the backward (TRL's default too; SmolLM2-135M on CPU: peak
    # RSS full 4.1 -> 3.3 GB, LoRA 3.1 -> 1.8 GB, for ~10-25 % more time per step) | mlp: only each
    # layer's MLP | false: keep every activation (fastest)
    gradient_checkpointing: Union[bool, str] = True
    prefix_sharing: bool = True  # prompt computed once per pair: [prompt | chosen | rejected]
    lm_head_chunk: int = 1024  # tokens per lm-head chunk; 0 = unchunked
    logging_steps: int = 1
    save_steps: int = 500  # checkpoint every N steps (what --resume continues from); 0: none
    save_total_limit: int = 2  # keep the newest N checkpoints; 0: keep all
    eval_steps: int = 0
    report_to: Union[str, list] = "none"  # besides OUT/metrics.jsonl: tensorboard | trackio | wandb | mlflow | ...
    num_workers: int = 0
    progress: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def resolved(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _type_ok(value: Any, annotation: Any) -> Any:
    """Coerce `value` to the annotated type, or raise ValueError saying what was expected."""
    if isinstance(annotation, str):
        annotation = eval(annotation, globals())  # annotations are strings (from __future__)
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
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
        raise ValueError(f"{' or '.join(expected)}, found {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"true or false, found {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"an integer, found {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 5e-6 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"a number, found {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"a string, found {value!r}")
    if annotation is list:
        if isinstance(value, list):
            return value
        raise ValueError(f"a list, found {value!r}")
    if annotation is dict:
        if isinstance(value, dict):
            return value
        raise ValueError(f"a mapping, found {value!r}")
    return value


def _section_types(section_cls) -> dict:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def from_dict(raw: dict, source: str = "config") -> Config:
    """Build a Config from nested dicts; unknown sections/keys and wrong types are errors."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PrefoptError(
            f"{source}: expected a mapping of sections ({', '.join(SECTIONS)}), found {type(raw).__name__}"
        )
    cfg = Config()
    for section, values in raw.items():
        if section not in SECTIONS:
            raise PrefoptError(f"{source}: unknown section '{section}'. Known sections: {', '.join(SECTIONS)}.")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise PrefoptError(f"{source}: section '{section}' must be a mapping of keys, found {values!r}")
        set_keys(getattr(cfg, section), values, source, section)
    complete(cfg, source)
    return cfg


def set_keys(obj, values: dict, source: str, section: str = "") -> None:
    """Set `values` on the dataclass `obj`, each coerced to its field's type; an unknown key or a
    wrong type is an error naming `section.key` (or `key` without a section)."""
    types_ = _section_types(type(obj))
    for key, value in values.items():
        name = f"{section}.{key}" if section else key
        if key not in types_:
            known = f"Known keys of '{section}'" if section else "Known keys"
            raise PrefoptError(f"{source}: unknown key '{name}'. {known}: {', '.join(types_)}.")
        try:
            setattr(obj, key, _type_ok(value, types_[key]))
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
        bad(f"must be a mapping of loss name to weight ({example}), found {w!r}.")
    parts: list[tuple[str, float]] = []
    for name, weight in w.items():
        key = losses.ALIASES.get(str(name), str(name))
        if key not in losses.REGISTRY:
            bad(f"names '{name}', which is not a known loss; paired losses: {known}.")
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
        return losses.combine(parts, name=f"{COMBINE}(" + " + ".join(f"{w:g}·{n}" for n, w in parts) + ")")
    key = losses.ALIASES.get(loss.name, loss.name)
    if key not in losses.REGISTRY:
        raise PrefoptError(
            f"{source}: 'loss.name' is '{loss.name}'; known losses: "
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
        if name not in REPORT_TO:
            raise PrefoptError(
                f"{source}: 'train.report_to' has '{name}'; expected none, all, or any of "
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
    for key in dataclasses.asdict(loss):
        if key not in _NOT_HYPERPARAMETERS and getattr(loss, key) is not None and key not in spec.hyperparameters:
            # e.g. a YAML made for DPO (beta) run with --loss.name orpo: said, dropped, not fatal
            logging.getLogger("prefopt").warning(
                "%s: loss.%s = %r is not used by loss '%s' (it takes: %s%s); ignored.",
                source,
                key,
                getattr(loss, key),
                spec.name,
                ", ".join(spec.hyperparameters) or "none",
                f"; modifiers {', '.join(LOSS_MODIFIERS)}" if spec.paired else "",
            )
            setattr(loss, key, None)
    for key, default in spec.hyperparameters.items():
        if getattr(loss, key) is None:
            setattr(loss, key, default)
    validate(cfg, source)


def _bad(source: str, key: str, msg: str):
    raise PrefoptError(f"{source}: '{key}' {msg}")


def validate(cfg: Config, source: str = "config") -> None:
    """A PrefoptError naming the first key of `cfg` whose value is out of range or inconsistent
    with another; `cfg` is not changed."""
    _validate_loss(cfg.loss, source)
    _validate_data(cfg.data, source)
    _validate_train(cfg.train, source)
    if cfg.model.dtype not in ("float32", "bfloat16", "float16"):
        _bad(source, "model.dtype", f"must be float32, bfloat16 or float16, found '{cfg.model.dtype}'.")
    if cfg.lora.r < 1:
        _bad(source, "lora.r", f"must be >= 1, found {cfg.lora.r}.")


def _validate_loss(loss: LossConfig, source: str) -> None:
    spec = resolve_loss(loss, source)
    if loss.name != COMBINE and loss.weights is not None:
        _bad(source, "loss.weights", f"is only used with loss.name: {COMBINE} (loss.name is '{loss.name}').")
    for key, on in (("ld_alpha", loss.ld_alpha is not None), ("wpo", loss.wpo)):
        if on and not spec.paired:
            _bad(source, f"loss.{key}", f"modifies paired losses; loss '{spec.name}' is unpaired.")
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
    if loss.label_smoothing is not None and not 0 <= loss.label_smoothing < 0.5:
        _bad(source, "loss.label_smoothing", f"must be in [0, 0.5), found {loss.label_smoothing}.")


def _validate_data(data: DataConfig, source: str) -> None:
    if data.truncation not in ("keep_end", "drop"):
        _bad(source, "data.truncation", f"must be 'keep_end' or 'drop', found '{data.truncation}'.")
    if data.chat_template not in ("auto", "always", "never"):
        _bad(source, "data.chat_template", f"must be auto, always or never, found '{data.chat_template}'.")
    if data.max_prompt_length >= data.max_length:
        _bad(
            source,
            "data.max_prompt_length",
            f"({data.max_prompt_length}) must be below data.max_length ({data.max_length}).",
        )
    if data.limit is not None and data.limit < 1:
        _bad(source, "data.limit", f"must be >= 1 (or null for all records), found {data.limit}.")
    try:
        formats.options_from(data).validate()
    except PrefoptError as e:
        raise PrefoptError(f"{source}: {e}") from None
    if data.max_prompt_length < 1:
        _bad(source, "data.max_prompt_length", f"must be >= 1, found {data.max_prompt_length}.")
    if not 0 <= data.eval_fraction < 1:
        _bad(source, "data.eval_fraction", f"must be in [0, 1), found {data.eval_fraction}.")


def _validate_train(train: TrainConfig, source: str) -> None:
    if not 0 <= train.warmup_ratio < 1:
        _bad(source, "train.warmup_ratio", f"must be in [0, 1), found {train.warmup_ratio}.")
    if train.epochs <= 0:
        _bad(source, "train.epochs", f"must be > 0, found {train.epochs}.")
    if train.gradient_checkpointing not in (True, False, "mlp"):
        _bad(
            source,
            "train.gradient_checkpointing",
            f"must be true (whole layers), mlp (only each layer's MLP) or "
            f"false, found {train.gradient_checkpointing!r}.",
        )
    if train.bf16 not in (True, False, "auto"):
        _bad(source, "train.bf16", f"must be true, false or auto, found {train.bf16!r}.")
    for key in ("batch_size", "grad_accum"):
        if getattr(train, key) < 1:
            _bad(source, f"train.{key}", f"must be >= 1, found {getattr(train, key)}.")
    _check_report_to(train.report_to, source)
    for key in ("save_steps", "save_total_limit", "eval_steps"):
        if getattr(train, key) < 0:
            _bad(source, f"train.{key}", f"must be >= 0 (0 = off), found {getattr(train, key)}.")
    if train.lr <= 0:
        _bad(source, "train.lr", f"must be > 0, found {train.lr}.")


def parse_overrides(args: list[str]) -> dict:
    """`--section.key value` (or `--section.key=value`) pairs -> nested dict. Values are YAML."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise PrefoptError(f"command line: expected an override like --train.lr 1e-5, found '{arg}'.")
        key = arg[2:]
        if "=" in key:
            key, text = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise PrefoptError(f"command line: '{arg}' needs a value.")
            text = args[i + 1]
            i += 2
        section, _, name = key.partition(".")
        if not name or "." in name:
            raise PrefoptError(f"command line: '--{key}' must have the form --section.key.")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        out.setdefault(section, {})[name] = value
    return out


def merge(base: dict, over: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (base or {}).items()}
    for section, values in over.items():
        if isinstance(out.get(section), dict) and isinstance(values, dict):
            out[section].update(values)
        else:
            out[section] = values
    return out


def read_yaml(path: Optional[str]) -> tuple[dict, str]:
    """(the mapping in YAML file `path`, its name for messages); ({}, "command line") for no file."""
    if path is None:
        return {}, "command line"
    p = Path(path)
    if not p.is_file():
        raise PrefoptError(f"{path}: config file not found.")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise PrefoptError(f"{path}:{where}: not valid YAML ({getattr(e, 'problem', e)}).") from None
    return raw, str(path)


def load(path: Optional[str], overrides: Optional[list[str]] = None) -> Config:
    raw, source = read_yaml(path)
    cfg_raw = merge(raw, parse_overrides(overrides or []))
    return from_dict(cfg_raw, source)


def save(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.resolved(), sort_keys=False))
