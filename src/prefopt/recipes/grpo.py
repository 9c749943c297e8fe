"""The GRPO recipe, `prefopt grpo CONFIG`: config -> prompts and reward -> model (+ reference) ->
GRPOTrainer -> saved folder. The run folder, resume, the NaN guard and the final save are the
training recipe's (prefopt.recipes.train); the config's grpo section says what to sample and how
to weigh it (docs/grpo.md).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Union

from prefopt import config as config_mod
from prefopt.config import Config
from prefopt.evaluation import rewards
from prefopt.modeling import load, reference
from prefopt.recipes.train import (
    _as_config,
    _checkpoint_to_resume,
    _fit,
    _is_main,
    _publish,
    _save_outputs,
    _stop_if_nonfinite,
    _tokenizer,
    check_flags,
    stopped,
)
from prefopt.tasks import prompt_sets
from prefopt.training import checkpoints, run_folder
from prefopt.training.grpo_trainer import GRPOTrainer
from prefopt.training.setup import (
    build_model,
    callbacks_for,
    return_large_frees,
    seed_everything,
    training_arguments,
    use_bf16,
)

log = logging.getLogger("prefopt")


def train_grpo(
    cfg: Union[Config, dict, str, None] = None,
    resume: bool = False,
    overwrite: bool = False,
    force: bool = False,
    *,
    reward=None,
) -> dict:
    """Run one GRPO job described by `cfg` (a Config, a dict of sections, a YAML path, or None for
    the defaults: the code task with its tests reward); returns a summary. `reward` (a function
    (prompts, completions) -> numbers) replaces grpo.reward. The run folder, --resume, --overwrite
    and --force behave as for `prefopt train`."""
    check_flags(resume, overwrite, force)
    cfg = _as_config(cfg)
    t0 = time.time()
    return_large_frees()
    seed_everything(cfg.train.seed)
    reward_fn = (
        rewards.checked(reward, getattr(reward, "__name__", "reward")) if reward else rewards.get(cfg.grpo.reward)
    )
    path = load.resolve(cfg.model.name)
    out = run_folder.claim(cfg, path, resume=resume, overwrite=overwrite, is_main=_is_main())
    try:
        return _run(cfg, path, out, reward_fn, resume, force, t0)
    finally:
        run_folder.release(out)


def prompts_of(cfg: Config, tokenizer) -> list[dict]:
    """The training prompts of cfg.grpo (the train part of its prompt set, the first grpo.limit),
    as {"prompt": text, "prompt_ids": token ids}."""
    texts = prompt_sets.load(cfg.grpo.prompts, tokenizer).train
    texts = texts[: cfg.grpo.limit] if cfg.grpo.limit else texts
    return [{"prompt": t, "prompt_ids": tokenizer(t, add_special_tokens=False).input_ids} for t in texts]


def make_grpo_trainer(cfg: Config, model, tokenizer, prompts: list[dict], reward_fn, bf16: bool, **kw) -> GRPOTrainer:
    """The GRPOTrainer of `cfg` for `model` on `prompts` with `reward_fn` (kw: args, ref_model,
    run_info, resume_step)."""
    g = cfg.grpo
    args = kw.pop("args", None) or training_arguments(cfg, bf16)
    return GRPOTrainer(
        model,
        args,
        reward=reward_fn,
        reward_name=reward_name(g.reward),
        prompts=prompts,
        processing_class=tokenizer,
        num_generations=g.num_generations,
        max_completion_length=g.max_completion_length,
        beta=g.beta,
        epsilon=g.epsilon,
        epsilon_high=g.epsilon_high,
        loss_type=g.loss_type,
        scale_rewards=g.scale_rewards,
        importance_sampling_level=g.importance_sampling_level,
        num_iterations=g.num_iterations,
        lm_head_chunk=cfg.train.lm_head_chunk,
        ref_model=kw.pop("ref_model", None),
        run_info=kw.pop("run_info", None),
        callbacks=callbacks_for(cfg, args, kw.pop("resume_step", None)),
    )


def reward_name(spec: str) -> str:
    """The reward's name in metric keys (rewards/<name>/mean): the built-in or factory name (vader,
    tests, regex, ...), else the function's name of module:function or file.py:function."""
    head, _, tail = spec.partition(":")
    return head if head in rewards.BUILTIN or head in rewards.FACTORIES or not tail else tail.rsplit(":", 1)[-1]


def _run(cfg: Config, path: str, out: Path, reward_fn, resume: bool, force: bool, t0: float) -> dict:
    """The run of `train_grpo` once its output folder is claimed."""
    tokenizer = _tokenizer(cfg, path)
    prompts = prompts_of(cfg, tokenizer)
    fingerprint = reference.data_fingerprint(prompts, f"grpo:{cfg.grpo.reward}")
    checkpoint = _checkpoint_to_resume(cfg, out, fingerprint, force) if resume else None
    bf16 = use_bf16(cfg.train.bf16)
    args = training_arguments(cfg, bf16)
    model = build_model(cfg, path)
    ref_model = None
    if cfg.grpo.beta > 0 and not cfg.lora.enabled:  # a full fine-tune keeps a frozen copy as its reference
        ref_model = reference.frozen_copy(model)
    trainer = make_grpo_trainer(
        cfg,
        model,
        tokenizer,
        prompts,
        reward_fn,
        bf16,
        args=args,
        ref_model=ref_model,
        run_info=run_folder.run_info(cfg, fingerprint),
        resume_step=checkpoints.step_of(checkpoint) if checkpoint else None,
    )
    if trainer.is_world_process_zero():
        config_mod.save(cfg, out / "prefopt.yaml")
    result = _fit(trainer, checkpoint)
    _stop_if_nonfinite(trainer, out)
    history = [h for h in trainer.state.log_history if "reward" in h]  # the steps that sampled
    summary = {
        "output_dir": str(out),
        "steps": trainer.state.global_step,
        "prompts": len(prompts),
        "completions_per_step": cfg.train.batch_size * cfg.train.grad_accum * cfg.grpo.num_generations,
        "first_reward": history[0].get("reward") if history else None,
        "last_reward": history[-1].get("reward") if history else None,
        "train_runtime": result.metrics.get("train_runtime") if result else None,
        "wall_s": round(time.time() - t0, 1),
        "bf16": bf16,
        "resumed_from": str(checkpoint) if checkpoint else None,
        "method": "grpo",
    }
    if stopped(trainer, out, summary):
        return summary
    _save_outputs(trainer, cfg, tokenizer, out, path)
    if trainer.is_world_process_zero():
        _publish(cfg, path, out, summary, command="prefopt grpo prefopt.yaml")
    log.info("done: %s", summary)
    return summary
