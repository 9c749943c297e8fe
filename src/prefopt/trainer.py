"""A transformers.Trainer whose loss is a preference loss: compute_loss and metrics, nothing else.

The optimiser, schedule, accumulation, mixed precision, checkpoints and DDP/FSDP/DeepSpeed all
stay transformers'/accelerate's. Metrics use the names TRL users know.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch
from transformers import Trainer, TrainerCallback

from . import losses
from .modeling.logprobs import sequence_logps


def reference_logps(model, batch: dict, ref_model=None, chunk: int = 1024) -> torch.Tensor:
    """Reference log-probs of a batch: precomputed, a frozen copy, or the policy with its adapter off."""
    if "ref_logps" in batch:
        return batch["ref_logps"]
    with torch.no_grad():
        if ref_model is not None:
            return sequence_logps(ref_model, batch, chunk)["logps"]
        base = model.module if hasattr(model, "module") and not hasattr(model, "disable_adapter") else model
        if not hasattr(base, "disable_adapter"):
            raise RuntimeError("no reference: give ref_model, precomputed ref_logps, or a peft model")
        with base.disable_adapter():
            return sequence_logps(model, batch, chunk)["logps"]


class PreferenceTrainer(Trainer):
    def __init__(self, *args, loss: losses.LossSpec, loss_kwargs: dict, ref_model=None,
                 lm_head_chunk: int = 1024, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_spec = loss
        self.loss_kwargs = dict(loss_kwargs)
        self.ref_model = ref_model
        self.lm_head_chunk = lm_head_chunk
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        # Our loss is a mean over the pairs of a micro-batch: the Trainer must divide by the number
        # of accumulation steps (1 × 8 accumulated == 8 × 1), never rescale by token counts.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        if ref_model is not None:
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = sequence_logps(model, inputs, self.lm_head_chunk)
        ref = reference_logps(model, inputs, self.ref_model, self.lm_head_chunk).to(out["logps"].dtype)
        logp_c, logp_r = out["logps"][0::2], out["logps"][1::2]
        ref_c, ref_r = ref[0::2], ref[1::2]
        per_pair = self.loss_spec.fn(logp_c, logp_r, ref_c, ref_r, **self.loss_kwargs)
        loss = per_pair.mean()

        beta = self.loss_kwargs.get("beta", 1.0)
        with torch.no_grad():
            reward_c = beta * (logp_c - ref_c)
            reward_r = beta * (logp_r - ref_r)
            stats = {
                "rewards/chosen": reward_c, "rewards/rejected": reward_r,
                "rewards/margins": reward_c - reward_r,
                "rewards/accuracies": (reward_c > reward_r).float(),
                "logps/chosen": logp_c, "logps/rejected": logp_r,
                "logps/ref_chosen": ref_c, "logps/ref_rejected": ref_r,
                "lengths/chosen": out["lengths"][0::2], "lengths/rejected": out["lengths"][1::2],
            }
            split = "train" if model.training else "eval"
            for k, v in stats.items():
                v = self.accelerator.gather_for_metrics(v.detach().float())
                self._metrics[split][k].append(v.mean().item())
        return (loss, out) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if split == "eval" else ""
        for k, v in self._metrics[split].items():
            if v:
                logs[prefix + k] = round(sum(v) / len(v), 6)
        self._metrics[split].clear()
        super().log(logs, start_time)


class JsonlMetrics(TrainerCallback):
    """Append every log entry (with its step) to OUT/metrics.jsonl."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")
