"""Building blocks every training job shares: precision, seeding, the model to train, the
collator, transformers' TrainingArguments and the PreferenceTrainer with its callbacks.

The training recipe (prefopt.recipes.train) and the experiments (prefopt.experiments) put these
together; nothing here reads a command line or decides what a job does.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import platform
import random
from pathlib import Path
from typing import Optional

import torch
from transformers import TrainingArguments, set_seed
from transformers.integrations import is_deepspeed_zero3_enabled

from prefopt import losses
from prefopt.config import Config, check_training_args, resolve_loss, training_args_kwargs
from prefopt.data.collate import Collator, subset_mode
from prefopt.errors import PrefoptError
from prefopt.files import write_text_atomic
from prefopt.modeling import load
from prefopt.modeling.checkpointing import checkpoint_mlps
from prefopt.modeling.logprobs import set_attention
from prefopt.training import checkpoints
from prefopt.training.monitor import FailureMonitor
from prefopt.training.trainer import JsonlMetrics, PreferenceTrainer

log = logging.getLogger("prefopt")


def bf16_supported() -> bool:
    """Whether bf16 autocast is fast here: a GPU with bf16, or a CPU with AVX512-BF16 or AMX
    (on other CPUs autocast is ~15x slower than float32)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def use_bf16(setting) -> bool:
    """train.bf16 resolved: "auto" means bf16_supported(), true/false as given."""
    return bf16_supported() if setting == "auto" else bool(setting)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (transformers.set_seed) with `seed`."""
    random.seed(seed)
    set_seed(seed)


# glibc's malloc keeps the memory of freed heap blocks for reuse, and raises its mmap threshold to
# the largest block freed (up to 32 MiB), so activation-sized blocks (megabytes at long rows) come
# from the heap and stay resident once freed. Measured on SmolLM2-135M, one 4k-token pair per step
# (docs/benchmarks.md): peak RSS 5.30 GB with glibc's defaults, of which ~1.7 GB was freed memory
# glibc kept; with blocks from 4 MiB up mapped on their own, and so returned when freed, 3.6-3.7 GB
# at about +20 % time (each step faults its long activations in afresh; from 1 MiB: 3.38 GB; from
# 16 MiB: 6.16 GB); at 256 tokens, batch 4, the peak and the time did not change.
MMAP_THRESHOLD = 4 << 20
_M_MMAP_THRESHOLD = -3  # <malloc.h>


def return_large_frees() -> bool:
    """Make glibc's malloc map blocks of MMAP_THRESHOLD bytes or more on their own, so that memory
    a step frees goes back to the OS instead of staying in the process (mallopt M_MMAP_THRESHOLD;
    process-wide, for the rest of the process). Nothing is changed where the C library is not glibc
    or the user set the threshold (MALLOC_MMAP_THRESHOLD_, or mmap_threshold in GLIBC_TUNABLES).
    Returns whether the threshold was set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def build_model(cfg: Config, path: str, model=None):
    """The model to train: `model` as given, or loaded from `path` with cfg.model's options; a LoRA
    adapter added when cfg.lora.enabled (unless it is a peft model already), and MLP-only
    checkpointing applied for gradient_checkpointing: mlp; the engine's attention path is
    train.attention."""
    if model is None:
        model = load.load_configured(path, cfg.model)
    if hasattr(model, "disable_adapter"):  # a peft model: its adapter is what trains
        cfg.lora.enabled = True
    elif cfg.lora.enabled:
        model = load.add_lora(model, cfg.lora)
    if cfg.train.gradient_checkpointing == "mlp" and checkpoint_mlps(model) == 0:
        log.warning(
            "train.gradient_checkpointing: mlp found no '*.mlp' modules in this model; nothing is "
            "checkpointed (use true for whole layers)"
        )
    set_attention(model, cfg.train.attention)
    return model


# TrainingArguments fields prefopt sets unless train: gives them. ddp_find_unused_parameters: every
# trainable weight takes part in each loss, but not in what the model's forward returns (the engine
# reads the decoder's output through a hook), so DDP must not search the forward's output for unused
# parameters — transformers turns the search on for a peft model, and it then marks the adapter's
# weights ready twice.
PASSTHROUGH_DEFAULTS = {"ddp_find_unused_parameters": False}


def _checkpointing_arg() -> str:
    fields = TrainingArguments.__dataclass_fields__
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


def training_arguments(cfg: Config, bf16: bool) -> TrainingArguments:
    """transformers' TrainingArguments for cfg.train, with every other TrainingArguments field the
    config passes through (train.args), checked by transformers itself (creating them sets up the
    distributed state under accelerate launch / torchrun)."""
    t = cfg.train
    return check_training_args(
        cfg,
        lambda: TrainingArguments(
            output_dir=t.output_dir,
            num_train_epochs=t.epochs,
            max_steps=t.max_steps,
            per_device_train_batch_size=t.batch_size,
            per_device_eval_batch_size=t.batch_size,
            gradient_accumulation_steps=t.grad_accum,
            learning_rate=t.lr,
            lr_scheduler_type=t.scheduler,
            warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm,
            seed=t.seed,
            bf16=bf16,
            use_cpu=not torch.cuda.is_available(),
            logging_steps=t.logging_steps,
            save_strategy="steps" if t.save_steps > 0 else "no",
            save_steps=t.save_steps if t.save_steps > 0 else 500,
            save_total_limit=t.save_total_limit or None,
            eval_strategy="steps" if t.eval_steps > 0 else "no",
            eval_steps=t.eval_steps if t.eval_steps > 0 else None,
            report_to=t.report_to,
            dataloader_num_workers=t.num_workers,
            remove_unused_columns=False,
            disable_tqdm=not t.progress,
            # "mlp" is prefopt's own (see build_model); newer transformers renamed the option
            **{_checkpointing_arg(): t.gradient_checkpointing is True},
            **{**PASSTHROUGH_DEFAULTS, **training_args_kwargs(cfg)},
        ),
    )


def make_collator(cfg: Config, tokenizer) -> Collator:
    """The batch collator for `cfg`: it flags a token subset only for LD-DPO (loss.ld_alpha set:
    the shared-length prefix) or a loss that scores one (SamPO: a sample drawn with train.seed)."""
    subset = subset_mode(resolve_loss(cfg.loss).token_subset, cfg.loss.ld_alpha)
    return Collator(tokenizer.pad_token_id, prefix_sharing=cfg.train.prefix_sharing, subset=subset, seed=cfg.train.seed)


def make_trainer(
    cfg: Config,
    spec: losses.LossSpec,
    model,
    tokenizer,
    collator,
    train_examples: list,
    eval_examples: list,
    bf16: bool,
    ref_model=None,
    args=None,
    resume_step: Optional[int] = None,
    run_info: Optional[dict] = None,
) -> PreferenceTrainer:
    """The PreferenceTrainer for tokenized examples (with ref_logps attached if precomputed).
    OUT/metrics.jsonl starts afresh, or when resuming from step `resume_step` keeps its lines up
    to that step; `run_info` (the run's config and data fingerprint) is saved in every checkpoint."""
    args = args or training_arguments(cfg, bf16)
    callbacks = callbacks_for(cfg, args, resume_step)
    loss_kwargs = {k: getattr(cfg.loss, k) for k in spec.hyperparameters}
    if ref_model is not None:
        set_attention(ref_model, cfg.train.attention)
    return PreferenceTrainer(
        model=model,
        args=args,
        train_dataset=train_examples,
        eval_dataset=eval_examples or None,
        data_collator=collator,
        processing_class=tokenizer,
        loss=spec,
        loss_kwargs=loss_kwargs,
        ref_model=ref_model,
        lm_head_chunk=cfg.train.lm_head_chunk,
        ld_alpha=cfg.loss.ld_alpha,
        wpo=cfg.loss.wpo,
        wpo_clamp=cfg.loss.wpo_clamp,
        run_info=run_info,
        precompute_reference=False,  # the recipe and the experiments attach it themselves (cached)
        callbacks=callbacks,
    )


def callbacks_for(cfg: Config, args: TrainingArguments, resume_step: Optional[int] = None) -> list:
    """The callbacks of every prefopt training job: OUT/metrics.jsonl (started afresh, or when
    resuming from step `resume_step` kept up to that step), the failure monitor, and the graceful
    stop on Ctrl-C / SIGTERM."""
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    if args.should_save:
        _keep_metrics_up_to(metrics_path, resume_step)
    return [JsonlMetrics(metrics_path), FailureMonitor(), checkpoints.GracefulStop()]


def _keep_metrics_up_to(path: Path, step: Optional[int]) -> None:
    """Truncate the metrics log to the steps <= `step` (all of it removed when step is None), so a
    resumed run's log holds each step once."""
    if not path.exists():
        return
    if step is None:
        path.unlink()
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:  # a line cut by the kill
            continue
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def check_zero3(cfg: Config, spec: losses.LossSpec) -> None:
    """Under DeepSpeed ZeRO-3 the weights exist only sharded inside the engine: no precompute
    pass and no frozen full reference copy outside it."""
    if not (spec.needs_reference and is_deepspeed_zero3_enabled()):
        return
    if cfg.reference.precompute:
        raise PrefoptError(
            "config: 'reference.precompute' is true, but under DeepSpeed ZeRO-3 the weights are "
            "sharded, so the reference cannot be computed before training; set "
            "reference.precompute: false (with lora.enabled: true), or use ZeRO-2 or FSDP."
        )
    if not cfg.lora.enabled:
        raise PrefoptError(
            "config: a full fine-tune with a reference model under DeepSpeed ZeRO-3 would need a "
            "second sharded engine for the frozen reference, which prefopt does not set up; use "
            "lora.enabled: true, a reference-free loss, ZeRO-2 or FSDP."
        )
