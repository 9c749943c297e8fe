"""The training recipe: config -> data -> tokens -> model (+ reference) -> Trainer -> saved folder.

This is the whole of `prefopt train`; every piece it uses is a component (prefopt.data,
prefopt.modeling, prefopt.training) that other jobs share.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from transformers import TrainerState

import prefopt
from prefopt import config as config_mod
from prefopt.config import Config
from prefopt.data.examples import load_examples
from prefopt.errors import PrefoptError
from prefopt.modeling import load, reference
from prefopt.training import checkpoints, hub, run_folder
from prefopt.training.monitor import FailureMonitor
from prefopt.training.setup import (
    build_model,
    check_zero3,
    make_collator,
    make_trainer,
    return_large_frees,
    seed_everything,
    training_arguments,
    use_bf16,
)

log = logging.getLogger("prefopt")


def train(
    cfg: Union[Config, dict, str, None] = None,
    progress: Optional[bool] = None,
    resume: bool = False,
    overwrite: bool = False,
    force: bool = False,
    *,
    model=None,
    tokenizer=None,
    train_dataset=None,
    eval_dataset=None,
) -> dict:
    """Run one training job described by `cfg` (a Config, a dict of sections, a YAML path, or None
    for the defaults); returns a summary (paths, steps, first/last loss).

    From Python, `model` (a transformers model, or a peft model), `tokenizer`, `train_dataset` and
    `eval_dataset` (a datasets.Dataset, a DatasetDict, or a list of records in any shape prefopt
    reads) replace model.name, data.train and data.eval.

    The run owns train.output_dir (prefopt.training.run_folder): a folder holding another run's
    outputs is refused unless `resume` (continue from its newest complete checkpoint, which must
    have been trained with this config and data unless `force`; from the start if there is none)
    or `overwrite` (remove them first). A Ctrl-C / SIGTERM stops after the current step with a
    checkpoint saved; the summary then has `interrupted` = the step, and no final model is written."""
    check_flags(resume, overwrite, force)
    cfg = _as_config(cfg)
    if hasattr(model, "peft_config"):  # a peft model: its adapter is what trains, and what the config records
        _record_adapter(cfg, model)
    progress = cfg.train.progress if progress is None else progress
    t0 = time.time()
    return_large_frees()
    seed_everything(cfg.train.seed)
    spec = config_mod.resolve_loss(cfg.loss)
    path = load.resolve(cfg.model.name) if model is None else _name_of(model, cfg)
    out = run_folder.claim(cfg, path, resume=resume, overwrite=overwrite, is_main=_is_main())
    inputs = Inputs(model, tokenizer, train_dataset, eval_dataset)
    try:
        return _run(cfg, spec, path, out, progress, resume, force, t0, inputs)
    finally:
        run_folder.release(out)


def check_flags(resume: bool, overwrite: bool, force: bool) -> None:
    """A PrefoptError for --resume with --overwrite, or --force without --resume."""
    if resume and overwrite:
        raise PrefoptError("--resume continues the run in train.output_dir and --overwrite removes it; give one.")
    if force and not resume:
        raise PrefoptError("--force goes with --resume (resume although the config or data changed).")


def stopped(trainer, out: Path, summary: dict) -> bool:
    """Whether Ctrl-C / SIGTERM stopped the run (a checkpoint saved); if so `summary` gets
    `interrupted` (the step) and `checkpoint`, and the way on is said."""
    stop = next(c for c in trainer.callback_handler.callbacks if isinstance(c, checkpoints.GracefulStop))
    if stop.stopped_at is None:
        return False
    summary["interrupted"] = stop.stopped_at
    summary["checkpoint"] = str(out / f"{checkpoints.PREFIX}{stop.stopped_at}")
    log.warning(
        "stopped at step %d; checkpoint saved in %s; continue with --resume", stop.stopped_at, summary["checkpoint"]
    )
    return True


@dataclass
class Inputs:
    """What a Python caller hands over instead of names in the config (None: read the config)."""

    model: object = None
    tokenizer: object = None
    train_dataset: object = None
    eval_dataset: object = None


def _as_config(cfg) -> Config:
    """`cfg` as a complete, validated Config of this run's own (the caller's object is not changed):
    a Config, a dict of sections, a YAML path, or None for the defaults."""
    if cfg is None:
        return config_mod.from_dict({}, "train()")
    if isinstance(cfg, dict):
        return config_mod.from_dict(cfg, "train()")
    if isinstance(cfg, (str, Path)):
        return config_mod.load(str(cfg))
    cfg = copy.deepcopy(cfg)
    config_mod.complete(cfg, "train()")
    return cfg


def _record_adapter(cfg: Config, model) -> None:
    """The LoRA settings of the peft model given, into the run's config (what trains, and is recorded)."""
    adapter = next(iter(model.peft_config.values()))
    cfg.lora.enabled = True
    for key, attribute in (("r", "r"), ("alpha", "lora_alpha"), ("dropout", "lora_dropout")):
        if getattr(adapter, attribute, None) is not None:
            setattr(cfg.lora, key, getattr(adapter, attribute))
    targets = getattr(adapter, "target_modules", None)
    if targets:
        cfg.lora.target_modules = targets if isinstance(targets, str) else sorted(targets)


def _name_of(model, cfg: Config) -> str:
    """The name a model object was loaded from (recorded as model.name in the saved config)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or getattr(model, "name_or_path", "")
    cfg.model.name = str(name) or "<model object>"
    return cfg.model.name


def _run(
    cfg: Config, spec, path: str, out: Path, progress: bool, resume: bool, force: bool, t0: float, inputs: Inputs
) -> dict:
    """The run of `train` once its output folder is claimed."""
    tokenizer = inputs.tokenizer or _tokenizer(cfg, path)
    train_examples, eval_examples, _ = load_examples(
        cfg, tokenizer, spec, progress, train_data=inputs.train_dataset, eval_data=inputs.eval_dataset
    )
    labels = "".join(str(int(ex["label"])) for ex in train_examples if "label" in ex)  # unpaired data's labels
    fingerprint = reference.data_fingerprint(train_examples, labels)
    checkpoint = _checkpoint_to_resume(cfg, out, fingerprint, force) if resume else None

    bf16 = use_bf16(cfg.train.bf16)
    args = training_arguments(cfg, bf16)  # sets up the distributed state under accelerate/torchrun
    check_zero3(cfg, spec)
    model = build_model(cfg, path, inputs.model)
    collator = make_collator(cfg, tokenizer)
    examples = [train_examples, eval_examples]
    ref_model = reference.for_training(
        model, spec, cfg, path, examples, collator, args, progress, from_policy=inputs.model is not None
    )
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
    if stopped(trainer, out, summary):
        return summary
    if eval_examples:
        trainer.evaluate()
    _save_outputs(trainer, cfg, tokenizer, out, path)
    if trainer.is_world_process_zero():
        _publish(cfg, path, out, summary)
    log.info("done: %s", summary)
    return summary


def _tokenizer(cfg: Config, path: str):
    """The tokenizer of the model at `path` (a PrefoptError when a model object came without one and
    its name does not lead to a tokenizer)."""
    if cfg.model.name == "<model object>":
        raise PrefoptError("train(): the model object given does not say where it was loaded from; pass tokenizer=.")
    return load.load_tokenizer(path, cfg.model.revision, cfg.model.trust_remote_code)


def _save_outputs(trainer, cfg: Config, tokenizer, out: Path, path: str) -> None:
    """The final model into `out` (atomically), and with lora.merge a merged copy in OUT/merged."""
    _save_final(trainer, out)
    if cfg.lora.enabled and cfg.lora.merge and trainer.is_world_process_zero():
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(out / "merged", safe_serialization=True)
        tokenizer.save_pretrained(out / "merged")


def _publish(cfg: Config, path: str, out: Path, summary: dict, command: str = "prefopt train prefopt.yaml") -> None:
    """Make OUT Hub-ready: the adapter names its base by its public hub id, a model card
    (README.md) says what was trained on what and how, and with train.push_to_hub it is pushed."""
    base = hub.public_base(cfg.model.name, path)
    hub.fix_adapter_base(out, base)
    push = cfg.train.push_to_hub
    repo_id = cfg.train.hub_model_id if push else None
    hub.write_model_card(
        out,
        cfg.resolved(),
        summary,
        base=base,
        command=command,
        version=prefopt.__version__,
        repo_id=repo_id,
    )
    if push:
        summary["hub_url"] = hub.push(out, repo_id, private=cfg.train.hub_private)
        log.info("pushed %s to %s", out, summary["hub_url"])


def _fit(trainer, checkpoint: Optional[Path]):
    """trainer.train(), from `checkpoint` when resuming (which restores prefopt's state too); None
    when that checkpoint is the last step."""
    if checkpoint is not None and checkpoints.finished(checkpoint):
        # killed after the last step's checkpoint but before the final save: transformers would
        # take one more step on resuming, so only the weights (and prefopt's state, for the final
        # evaluation) are restored here
        trainer.restore_state(checkpoint)
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
    run_folder.check_resume(cfg, checkpoint, fingerprint, force=force, record=_is_main())
    log.info("resuming from %s", checkpoint)
    return checkpoint


def _stop_if_nonfinite(trainer, out: Path) -> None:
    """A PrefoptError when the run stopped on a NaN/inf loss, gradient norm, weight or optimizer
    moment; it names the newest checkpoint verified finite."""
    monitor = next(c for c in trainer.callback_handler.callbacks if isinstance(c, FailureMonitor))
    step = monitor.nonfinite_step if monitor.nonfinite_step is not None else trainer.nonfinite_step
    if step is None and not trainer.state_is_finite():  # diverged after the last log and save
        step = trainer.state.global_step
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
