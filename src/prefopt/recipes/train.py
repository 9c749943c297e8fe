"""The training recipe: config -> data -> tokens -> model (+ reference) -> Trainer -> saved folder.

This is the whole of `prefopt train`; every piece it uses is a component (prefopt.data,
prefopt.modeling, prefopt.training) that other jobs share.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from transformers import TrainerState

from prefopt import config as config_mod
from prefopt.config import Config
from prefopt.data.examples import load_examples
from prefopt.errors import PrefoptError
from prefopt.modeling import load, reference
from prefopt.training import checkpoints, run_folder
from prefopt.training.monitor import FailureMonitor
from prefopt.training.setup import (
    build_model,
    check_zero3,
    make_collator,
    make_trainer,
    seed_everything,
    training_arguments,
    use_bf16,
)

log = logging.getLogger("prefopt")


def train(
    cfg: Config, progress: Optional[bool] = None, resume: bool = False, overwrite: bool = False, force: bool = False
) -> dict:
    """Run one training job described by `cfg`; returns a summary (paths, first/last loss).

    The run owns train.output_dir (prefopt.training.run_folder): a folder holding another run's
    outputs is refused unless `resume` (continue from its newest complete checkpoint, which must
    have been trained with this config and data unless `force`; from the start if there is none)
    or `overwrite` (remove them first). A Ctrl-C / SIGTERM stops after the current step with a checkpoint saved; the
    summary then has `interrupted` = the step, and no final model is written."""
    progress = cfg.train.progress if progress is None else progress
    t0 = time.time()
    seed_everything(cfg.train.seed)
    spec = config_mod.resolve_loss(cfg.loss)
    path = load.resolve(cfg.model.name)
    out = run_folder.claim(cfg, path, resume=resume, overwrite=overwrite, is_main=_is_main())
    try:
        return _run(cfg, spec, path, out, progress, resume, force, t0)
    finally:
        run_folder.release(out)


def _run(cfg: Config, spec, path: str, out: Path, progress: bool, resume: bool, force: bool, t0: float) -> dict:
    """The run of `train` once its output folder is claimed."""
    tokenizer = load.load_tokenizer(path, cfg.model.revision, cfg.model.trust_remote_code)
    train_examples, eval_examples, _ = load_examples(cfg, tokenizer, spec, progress)
    fingerprint = reference.data_fingerprint(train_examples)
    checkpoint = _checkpoint_to_resume(cfg, out, fingerprint, force) if resume else None

    bf16 = use_bf16(cfg.train.bf16)
    args = training_arguments(cfg, bf16)  # sets up the distributed state under accelerate/torchrun
    check_zero3(cfg, spec)
    model = build_model(cfg, path)
    collator = make_collator(cfg, tokenizer)
    examples = [train_examples, eval_examples]
    ref_model = reference.for_training(model, spec, cfg, path, examples, collator, args, bf16, progress)
    resume_step = checkpoints.step_of(checkpoint) if checkpoint else None
    trainer = make_trainer(
        cfg,
        spec,
        model,
        tokenizer,
        collator,
        train_examples,
        eval_examples,
        bf16,
        ref_model,
        args=args,
        resume_step=resume_step,
        run_info=run_folder.run_info(cfg, fingerprint),
    )
    if trainer.is_world_process_zero():
        config_mod.save(cfg, out / "prefopt.yaml")
    result = _fit(trainer, checkpoint)
    _stop_if_nonfinite(trainer, out)
    summary = _summary(trainer, result, out, train_examples, eval_examples, bf16, checkpoint, t0)
    stop = next(c for c in trainer.callback_handler.callbacks if isinstance(c, checkpoints.GracefulStop))
    if stop.stopped_at is not None:
        summary["interrupted"] = stop.stopped_at
        summary["checkpoint"] = str(out / f"{checkpoints.PREFIX}{stop.stopped_at}")
        log.warning(
            "stopped at step %d; checkpoint saved in %s; continue with --resume", stop.stopped_at, summary["checkpoint"]
        )
        return summary
    if eval_examples:
        trainer.evaluate()
    _save_outputs(trainer, cfg, tokenizer, out)
    log.info("done: %s", summary)
    return summary


def _save_outputs(trainer, cfg: Config, tokenizer, out: Path) -> None:
    """The final model into `out` (atomically), and with lora.merge a merged copy in OUT/merged."""
    _save_final(trainer, out)
    if cfg.lora.enabled and cfg.lora.merge and trainer.is_world_process_zero():
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(out / "merged", safe_serialization=True)
        tokenizer.save_pretrained(out / "merged")


def _fit(trainer, checkpoint: Optional[Path]):
    """trainer.train(), from `checkpoint` when resuming; None when that checkpoint is the last step."""
    if checkpoint is not None:
        trainer.restore_loss_state(checkpoint)
    if checkpoint is not None and checkpoints.finished(checkpoint):
        # killed after the last step's checkpoint but before the final save: transformers would
        # take one more step on resuming, so only the weights are restored here
        trainer._load_from_checkpoint(str(checkpoint))
        trainer.state = TrainerState.load_from_json(str(checkpoint / checkpoints.COMPLETE_MARKER))
        return None
    return trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)


def _is_main() -> bool:
    """Whether this is the first process of the job (torchrun / accelerate launch set RANK)."""
    return int(os.environ.get("RANK", "0")) == 0


def _checkpoint_to_resume(cfg: Config, out: Path, fingerprint: str, force: bool) -> Optional[Path]:
    """The newest complete checkpoint in `out`, checked to belong to this config and data (None:
    there is none; the run starts from the beginning)."""
    checkpoint = checkpoints.latest(out)
    if checkpoint is None:
        if run_folder.prior_outputs(out):
            raise PrefoptError(
                f"--resume: {out} holds a run's outputs but no complete checkpoint to continue from (a finished "
                "run without checkpoints, or one stopped before its first); use --overwrite to start again there, "
                "or another train.output_dir."
            )
        log.warning("--resume: no complete checkpoint in %s; starting from the beginning", out)
        return None
    run_folder.check_resume(cfg, checkpoint, fingerprint, force=force)
    log.info("resuming from %s", checkpoint)
    return checkpoint


def _stop_if_nonfinite(trainer, out: Path) -> None:
    """A PrefoptError when the run stopped on a NaN/inf loss, gradient norm, weight or optimizer
    moment; it names the newest checkpoint verified finite."""
    monitor = next(c for c in trainer.callback_handler.callbacks if isinstance(c, FailureMonitor))
    step = monitor.nonfinite_step if monitor.nonfinite_step is not None else trainer.nonfinite_step
    if step is None:
        return
    last_good = checkpoints.last_good(out)
    raise PrefoptError(
        f"training stopped at step {step}: the loss, gradient norm or weights are not finite; nothing was saved "
        f"from that step on ({out}/metrics.jsonl has the log"
        + (f"; {last_good} is the last checkpoint verified finite" if last_good else "; no checkpoint was saved")
        + "). Lower train.lr or check the data."
    )


def _summary(trainer, result, out: Path, train_examples, eval_examples, bf16: bool, checkpoint, t0: float) -> dict:
    losses_seen = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "output_dir": str(out),
        "steps": trainer.state.global_step,
        "train_pairs": len(train_examples),
        "eval_pairs": len(eval_examples),
        "first_loss": losses_seen[0] if losses_seen else None,
        "last_loss": losses_seen[-1] if losses_seen else None,
        "train_runtime": result.metrics.get("train_runtime") if result else None,
        "wall_s": round(time.time() - t0, 1),
        "bf16": bf16,
        "resumed_from": str(checkpoint) if checkpoint else None,
    }


def _save_final(trainer, out: Path) -> None:
    """The trained model into `out`, each file written in OUT/.partial/final and renamed into
    place, so a kill during the save never leaves a truncated weights file."""
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
