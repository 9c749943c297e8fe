"""The training recipe: config -> data -> tokens -> model (+ reference) -> Trainer -> saved folder."""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Optional

import torch

from . import checkpoints
from . import config as config_mod
from . import losses
from .config import Config
from .data.collate import Collator
from .data import formats
from .data.tokenize import attach_kl_completions, tokenize_pairs
from .errors import PrefoptError
from .modeling import load, reference
from .monitor import FailureMonitor

log = logging.getLogger("prefopt")


def bf16_supported() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    # On CPUs without native bf16 (no AVX512-BF16/AMX) autocast is ~15x slower than fp32.
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def use_bf16(setting) -> bool:
    return bf16_supported() if setting == "auto" else bool(setting)


def seed_everything(seed: int) -> None:
    from transformers import set_seed

    random.seed(seed)
    set_seed(seed)


def load_examples(cfg: Config, tokenizer, spec: losses.LossSpec, progress: bool = True):
    d = cfg.data
    if d.train is None:
        raise PrefoptError("config: 'data.train' is not set; give a file, a save_to_disk folder or a hub id.")
    pairs, shape = read_data(d.train, d, d.limit)
    check_shape(spec, shape, d.train)
    kw = dict(max_length=d.max_length, max_prompt_length=d.max_prompt_length,
              truncation=d.truncation, chat_template=d.chat_template)
    train, stats = tokenize_pairs(pairs, tokenizer, progress=progress, **kw)
    eval_examples: list[dict] = []
    if d.eval:
        eval_pairs, eval_shape = read_data(d.eval, d)
        check_shape(spec, eval_shape, d.eval)
        eval_examples, _ = tokenize_pairs(eval_pairs, tokenizer, **kw)
    elif d.eval_fraction > 0:
        order = list(range(len(train)))
        random.Random(cfg.train.seed).shuffle(order)
        n_eval = max(1, int(round(len(train) * d.eval_fraction)))
        eval_idx = set(order[:n_eval])
        eval_examples = [train[i] for i in sorted(eval_idx)]
        train = [ex for i, ex in enumerate(train) if i not in eval_idx]
    if not train:
        raise PrefoptError(f"{d.train}: no pair is left to train on ({stats.report()}).")
    if spec.name in KL_BASELINE_LOSSES:
        attach_kl_completions(train, cfg.train.seed)
        if eval_examples:
            attach_kl_completions(eval_examples, cfg.train.seed)
    return train, eval_examples, stats


def read_data(source: str, d, limit=None) -> tuple[list, str]:
    """Pairs (or unpaired examples) of `source` read with the config's data options; what was
    skipped is logged, counted by reason."""
    loaded = formats.load(source, d.split, limit, formats.options_from(d))
    log.info("%s: %s", source, loaded.report())
    for reason, message in loaded.examples.items():
        log.warning("skipped %d record(s): %s; the first: %s", loaded.skipped[reason], reason, message)
    return loaded.items, loaded.shape


KL_BASELINE_LOSSES = ("kto",)  # unpaired losses that use the mismatched-completion KL estimate z0


def check_shape(spec: losses.LossSpec, shape: str, source: str) -> None:
    if spec.paired and shape == "unpaired":
        raise PrefoptError(
            f"{source}: loss '{spec.name}' needs preference pairs (prompt, chosen, rejected), but the data is "
            f"unpaired (completion + label). Use an unpaired loss ({', '.join(losses.names(paired=False))}) "
            "or give paired data.")
    if not spec.paired and shape != "unpaired":
        raise PrefoptError(
            f"{source}: loss '{spec.name}' needs unpaired data (prompt, completion, label: true/false, or "
            f"messages + label), but the data holds {shape} pairs. Use a paired loss such as sigmoid, or "
            "give unpaired data.")


def build_model(cfg: Config, path: str):
    model = load.load_model(path, dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation,
                            revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.lora.enabled:
        model = load.add_lora(model, cfg.lora)
    if cfg.train.gradient_checkpointing == "mlp":
        from .modeling.checkpointing import checkpoint_mlps

        if checkpoint_mlps(model) == 0:
            log.warning("train.gradient_checkpointing: mlp found no '*.mlp' modules in this model; nothing is "
                        "checkpointed (use true for whole layers)")
    return model


def _checkpointing_arg() -> str:
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


def training_arguments(cfg: Config, bf16: bool):
    from transformers import TrainingArguments

    t = cfg.train
    return TrainingArguments(
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
    )


def make_trainer(cfg: Config, spec: losses.LossSpec, model, tokenizer, collator, train_examples: list,
                 eval_examples: list, bf16: bool, ref_model=None, args=None, resume_step: Optional[int] = None):
    """The PreferenceTrainer for tokenized examples (with ref_logps attached if precomputed).
    OUT/metrics.jsonl starts afresh, or when resuming from step `resume_step` keeps its lines up
    to that step."""
    from .trainer import JsonlMetrics, PreferenceTrainer

    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    args = args or training_arguments(cfg, bf16)
    metrics_path = out / "metrics.jsonl"
    if args.should_save:
        _keep_metrics_up_to(metrics_path, resume_step)
    loss_kwargs = {k: getattr(cfg.loss, k) for k in spec.hyperparameters}
    return PreferenceTrainer(
        model=model, args=args, train_dataset=train_examples,
        eval_dataset=eval_examples or None, data_collator=collator, processing_class=tokenizer,
        loss=spec, loss_kwargs=loss_kwargs, ref_model=ref_model, lm_head_chunk=cfg.train.lm_head_chunk,
        ld_alpha=cfg.loss.ld_alpha, wpo=cfg.loss.wpo,
        callbacks=[JsonlMetrics(metrics_path), FailureMonitor(), checkpoints.GracefulStop()],
    )


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
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def make_collator(cfg: Config, tokenizer) -> Collator:
    """The batch collator for `cfg`: flags LD-DPO's shared-length prefixes only when loss.ld_alpha is set."""
    return Collator(tokenizer.pad_token_id, prefix_sharing=cfg.train.prefix_sharing,
                    ld_prefix=cfg.loss.ld_alpha is not None)


def train(cfg: Config, progress: Optional[bool] = None, resume: bool = False) -> dict:
    """Run one training job described by `cfg`; returns a summary (paths, first/last loss).

    resume: continue from the newest complete checkpoint in the output folder (from the start if
    there is none). A Ctrl-C / SIGTERM stops after the current step with a checkpoint saved; the
    summary then has `interrupted` = the step, and no final model is written."""
    progress = cfg.train.progress if progress is None else progress
    t0 = time.time()
    out = Path(cfg.train.output_dir)
    seed_everything(cfg.train.seed)
    spec = config_mod.resolve_loss(cfg.loss)
    path = load.resolve(cfg.model.name)
    tokenizer = load.load_tokenizer(path, cfg.model.revision, cfg.model.trust_remote_code)
    train_examples, eval_examples, _ = load_examples(cfg, tokenizer, spec, progress)

    bf16 = use_bf16(cfg.train.bf16)
    args = training_arguments(cfg, bf16)  # sets up the distributed state under accelerate/torchrun
    checkpoint = _checkpoint_to_resume(cfg, out) if resume else None
    _check_zero3(cfg, spec)
    model = build_model(cfg, path)
    collator = make_collator(cfg, tokenizer)

    ref_model = None
    if spec.needs_reference:
        if cfg.reference.precompute:
            cache = Path(cfg.reference.cache_dir) if cfg.reference.cache_dir else load.cache_dir() / "reference"
            if torch.cuda.is_available():
                model.to(args.device)
            # under DDP each process computes every world-th batch and all share the results; the
            # first process of each machine writes the cache
            for exs in (train_examples, eval_examples):
                reference.precompute(model, exs, collator, cache_dir=cache,
                                     batch_size=2 * cfg.train.batch_size, chunk=cfg.train.lm_head_chunk,
                                     autocast_dtype=torch.bfloat16 if bf16 else None,
                                     progress=progress and args.process_index == 0,
                                     shard=(args.process_index, args.world_size),
                                     write_cache=args.local_process_index == 0)
        elif not cfg.lora.enabled:
            ref_model = load.load_model(path, dtype=cfg.model.dtype,
                                        attn_implementation=cfg.model.attn_implementation,
                                        revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
            ref_model.requires_grad_(False).eval()

    resume_step = checkpoints.step_of(checkpoint) if checkpoint else None
    trainer = make_trainer(cfg, spec, model, tokenizer, collator, train_examples, eval_examples, bf16, ref_model,
                           args=args, resume_step=resume_step)
    if trainer.is_world_process_zero():
        config_mod.save(cfg, out / "prefopt.yaml")
    if checkpoint is not None:
        trainer.restore_loss_state(checkpoint)
    if checkpoint is not None and _finished(checkpoint):
        # killed after the last step's checkpoint but before the final save: transformers would
        # take one more step on resuming, so only the weights are restored here
        from transformers import TrainerState

        trainer._load_from_checkpoint(str(checkpoint))
        trainer.state = TrainerState.load_from_json(str(checkpoint / checkpoints.COMPLETE_MARKER))
        result = None
    else:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    monitor = next(c for c in trainer.callback_handler.callbacks if isinstance(c, FailureMonitor))
    if monitor.nonfinite_step is not None:
        last_good = checkpoints.latest(out)
        raise PrefoptError(f"training stopped at step {monitor.nonfinite_step}: the loss or gradient norm is not "
                           f"finite; the model was not saved ({out}/metrics.jsonl has the log"
                           + (f"; {last_good} is the last good checkpoint" if last_good else "")
                           + "). Lower train.lr or check the data.")
    stop = next(c for c in trainer.callback_handler.callbacks if isinstance(c, checkpoints.GracefulStop))
    losses_seen = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary = {
        "output_dir": str(out), "steps": trainer.state.global_step, "train_pairs": len(train_examples),
        "eval_pairs": len(eval_examples), "first_loss": losses_seen[0] if losses_seen else None,
        "last_loss": losses_seen[-1] if losses_seen else None, "train_runtime": result.metrics.get("train_runtime") if result else None,
        "wall_s": round(time.time() - t0, 1), "bf16": bf16, "resumed_from": str(checkpoint) if checkpoint else None,
    }
    if stop.stopped_at is not None:
        summary["interrupted"] = stop.stopped_at
        summary["checkpoint"] = str(out / f"{checkpoints.PREFIX}{stop.stopped_at}")
        log.warning("stopped at step %d; checkpoint saved in %s; continue with --resume", stop.stopped_at,
                    summary["checkpoint"])
        return summary
    if eval_examples:
        trainer.evaluate()
    _save_final(trainer, out)
    if cfg.lora.enabled and cfg.lora.merge and trainer.is_world_process_zero():
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(out / "merged", safe_serialization=True)
        tokenizer.save_pretrained(out / "merged")
    log.info("done: %s", summary)
    return summary


def _save_final(trainer, out: Path) -> None:
    """The trained model into `out`, each file written in OUT/.partial/final and renamed into
    place, so a kill during the save never leaves a truncated weights file."""
    import shutil

    staging = out / checkpoints.STAGING / "final"
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        for f in sorted(staging.iterdir()):
            f.replace(out / f.name)
        checkpoints.clear_staging(out)
    trainer.accelerator.wait_for_everyone()


def _check_zero3(cfg: Config, spec: losses.LossSpec) -> None:
    """Under DeepSpeed ZeRO-3 the weights exist only sharded inside the engine: no precompute
    pass and no frozen full reference copy outside it."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not (spec.needs_reference and is_deepspeed_zero3_enabled()):
        return
    if cfg.reference.precompute:
        raise PrefoptError("config: 'reference.precompute' is true, but under DeepSpeed ZeRO-3 the weights are "
                           "sharded, so the reference cannot be computed before training; set "
                           "reference.precompute: false (with lora.enabled: true), or use ZeRO-2 or FSDP.")
    if not cfg.lora.enabled:
        raise PrefoptError("config: a full fine-tune with a reference model under DeepSpeed ZeRO-3 would need a "
                           "second sharded engine for the frozen reference, which prefopt does not set up; use "
                           "lora.enabled: true, a reference-free loss, ZeRO-2 or FSDP.")


def _finished(checkpoint: Path) -> bool:
    state = json.loads((checkpoint / checkpoints.COMPLETE_MARKER).read_text())
    return state.get("max_steps", 0) > 0 and state.get("global_step", 0) >= state["max_steps"]


def _checkpoint_to_resume(cfg: Config, out: Path) -> Optional[Path]:
    """The newest complete checkpoint in `out` (None: start from the beginning), after warning
    about settings that differ from the run that wrote it."""
    checkpoint = checkpoints.latest(out)
    if checkpoint is None:
        log.warning("--resume: no complete checkpoint in %s; starting from the beginning", out)
        return None
    saved = out / "prefopt.yaml"
    if saved.is_file():
        import yaml

        before = yaml.safe_load(saved.read_text()) or {}
        now = cfg.resolved()
        changed = [f"{sec}.{k}" for sec, keys in now.items() if isinstance(keys, dict)
                   for k, v in keys.items() if isinstance(before.get(sec), dict) and k in before[sec]
                   and before[sec][k] != v and (sec, k) not in (("train", "progress"),)]
        if changed:
            log.warning("--resume: these settings differ from the run that wrote %s: %s; the result will not "
                        "equal an uninterrupted run's", checkpoint, ", ".join(changed))
    log.info("resuming from %s", checkpoint)
    return checkpoint
