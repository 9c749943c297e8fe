"""GRPO as a transformers.Trainer: each optimizer step samples a group of G completions per prompt
from the current policy, scores them with a reward function and takes the clipped, group-relative
policy-gradient step of `prefopt.grpo` (whose docstrings hold the equations).

The step, for a batch of P prompts (train.batch_size per device, × grad_accum micro-batches):

1. sample G completions per prompt from the policy as it is (temperature 1, no top-k/top-p; seeded
   by the run's seed, the step and the micro-batch, so a resumed run samples what the
   uninterrupted one did);
2. reward each (prompts, completions) -> one number per completion; advantages relative to the
   group (`grpo.group_advantages`);
3. one forward of the log-prob engine per micro-batch: each prompt is one row [prompt | c_1 | … |
   c_G], the prompt computed once for its G completions (each completion attends to the prompt
   and to itself, exactly as if alone; the data collator's layout for pairs, with G branches);
4. `grpo.policy_loss` on the per-token log-probs; with num_iterations μ > 1 the same sampled batch
   serves μ optimizer steps, the ratio taken to the log-probs recorded when it was sampled, and
   the batch is saved with each checkpoint so that a resumed run continues the cycle exactly.

Checkpoints, NaN guard, resume and metrics.jsonl are RunTrainer's, as for the preference losses.
Metrics carry TRL's GRPOTrainer names: reward, reward_std, frac_reward_zero_std,
rewards/<name>/mean and /std, kl (when β > 0), clip_ratio/low_mean, high_mean, region_mean,
completions/mean_length, min_length, max_length, clipped_ratio (the completions cut at
max_completion_length); and prefix_sharing/tokens_saved: the prompt tokens the engine did not
compute again per micro-batch, (G − 1) × the prompts' lengths.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Sampler
from transformers import TrainingArguments

from prefopt import grpo
from prefopt.data.collate import Collator
from prefopt.modeling import reference
from prefopt.modeling.logprobs import padded_tokens, sequence_logps
from prefopt.modeling.sampling import sample
from prefopt.training.trainer import RunTrainer

log = logging.getLogger("prefopt")

# in a checkpoint: the sampled batch a cycle of μ steps reuses, one file per process
BUFFER_FILE = "prefopt_grpo_batch-{rank}.safetensors"


class GRPOTrainer(RunTrainer):
    """GRPO on `prompts` (a list of {"prompt": text, "prompt_ids": token ids}) with `reward`
    ((prompt texts, completion texts) -> one number each; prefopt.evaluation.rewards). Each step
    takes args.per_device_train_batch_size prompts and samples `num_generations` completions of
    each. The objective's options are TRL GRPOConfig's (see prefopt.grpo). The reference, needed
    only when beta > 0, is `ref_model`, else the policy with its adapter off (a peft model)."""

    def __init__(
        self,
        model,
        args: TrainingArguments,
        *,
        reward: Callable[[list, list], list],
        prompts: list[dict],
        processing_class,
        reward_name: str = "reward",
        num_generations: int = 4,
        max_completion_length: int = 160,
        beta: float = 0.0,
        epsilon: float = 0.2,
        epsilon_high: Optional[float] = None,
        loss_type: str = "dapo",
        scale_rewards: str = "group",
        importance_sampling_level: str = "token",
        num_iterations: int = 1,
        ref_model=None,
        lm_head_chunk: int = 1024,
        run_info: Optional[dict] = None,
        **kwargs,
    ):
        args.remove_unused_columns = False  # batches are prefopt's rows, not forward() arguments
        if getattr(processing_class, "pad_token_id", None) is None:
            raise ValueError("GRPOTrainer: the tokenizer has no pad token; set tokenizer.pad_token first")
        disable_dropout(model)
        super().__init__(
            model=model,
            args=args,
            train_dataset=list(prompts),
            data_collator=_as_list,
            processing_class=processing_class,
            **kwargs,
        )
        if beta > 0 and ref_model is None and not hasattr(self.model, "disable_adapter"):
            raise ValueError("beta > 0 needs a reference: a peft model (the adapter off) or ref_model")
        self.reward, self.reward_name = reward, reward_name
        self.num_generations, self.max_completion_length = num_generations, max_completion_length
        self.objective = dict(
            beta=beta,
            epsilon_low=epsilon,
            epsilon_high=epsilon_high,
            loss_type=loss_type,
            importance_sampling_level=importance_sampling_level,
            max_completion_length=max_completion_length,
        )
        self.scale_rewards, self.num_iterations, self.lm_head_chunk = scale_rewards, num_iterations, lm_head_chunk
        self.ref_model = None if ref_model is None else self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        self.collator = Collator(processing_class.pad_token_id)
        self._init_run_state(run_info)
        self.model_accepts_loss_kwargs = False
        # dapo divides each micro-batch's token sum by the global batch's token count (its loss is
        # already the global mean); the others are means per micro-batch, averaged by the Trainer
        self.loss_is_scaled_for_ga = loss_type == "dapo"
        self._batches: Optional[list[dict]] = None  # the sampled micro-batches of this cycle of μ steps
        self._batches_step: Optional[int] = None  # the step that sampled them

    # ---- data: prompts in, sampled and scored groups out ----

    def _get_train_sampler(self, train_dataset=None):
        """With μ > 1, each global batch of prompts comes μ times in a row (so that an epoch still
        sees every prompt); else transformers' own."""
        if self.num_iterations == 1:
            return super()._get_train_sampler(train_dataset)
        block = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
        block *= self.accelerator.num_processes
        return RepeatedBlocks(len(self.train_dataset), block, self.num_iterations, self.args.seed)

    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        """The micro-batches of one optimizer step: sampled, scored and collated from the prompts
        transformers hands over (reused from the cycle's first step when μ > 1), and the number of
        completion tokens over all of them and all processes (dapo's denominator)."""
        prompt_batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        step = self.state.global_step
        if self._batches is None or step % self.num_iterations == 0:
            self._batches = [self._sampled_batch(prompts, step, i) for i, prompts in enumerate(prompt_batches)]
            self._batches_step = step
        elif len(self._batches) != len(prompt_batches) or step - self._batches_step >= self.num_iterations:
            raise RuntimeError(
                f"GRPO step {step}: the sampled batch of step {self._batches_step} "
                f"({len(self._batches)} micro-batches) does not belong to this cycle of "
                f"{self.num_iterations} steps ({len(prompt_batches)} micro-batches)"
            )
        tokens = torch.tensor(float(sum(int(b["score_seq"].numel()) for b in self._batches)), device=device)
        if self.accelerator.num_processes > 1:  # DDP averages gradients: the per-process share
            tokens = self.accelerator.reduce(tokens, "sum") / self.accelerator.num_processes
        return [dict(b) for b in self._batches], tokens

    @torch.no_grad()
    def _sampled_batch(self, prompts: list[dict], step: int, micro: int) -> dict:
        """G completions of each prompt from the policy, their rewards and advantages, collated into
        the engine's rows; with μ > 1 also their per-token log-probs now (`old_logp`), and with β > 0
        the reference's (`ref_logp`)."""
        model = self.accelerator.unwrap_model(self.model)
        G = self.num_generations
        seed = _seed(self.args.seed, step, micro, self.accelerator.process_index)
        devices = list(range(torch.cuda.device_count()))  # sample() seeds every device
        with torch.random.fork_rng(devices=devices):  # the trainer's own random streams stay untouched
            groups = sample(
                model,
                self.processing_class,
                [p["prompt_ids"] for p in prompts],
                G,
                max_new_tokens=self.max_completion_length,
                seed=seed,
                progress=False,
            )
        texts = [self.processing_class.decode(c, skip_special_tokens=True) for g in groups for c in g]
        values = self.reward([p["prompt"] for p in prompts for _ in range(G)], texts)
        rewards = torch.tensor(values, dtype=torch.float32).reshape(len(prompts), G)
        advantages, stats = grpo.group_advantages(rewards, self.scale_rewards)
        batch = self.collator([{"prompt_ids": p["prompt_ids"], "group_ids": g} for p, g in zip(prompts, groups)])
        batch["advantages"] = advantages.reshape(-1)
        if self.num_iterations > 1 or self.objective["beta"] > 0:
            batch = self._with_reference_logps(batch)
        self._record_sampling(stats, rewards, groups)
        return batch

    def _with_reference_logps(self, batch: dict) -> dict:
        """`batch` with `old_logp` (the policy's per-token log-probs as sampled; μ > 1) and
        `ref_logp` (the reference's; β > 0), each [N, T] as the loss lays them out."""
        device = self.args.device
        on_device = {k: v.to(device) for k, v in batch.items()}
        n = int(batch["n_seqs"])
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.args.bf16)
        was_training = self.model.training
        self.model.eval()
        try:
            with autocast:
                if self.num_iterations > 1:
                    out = sequence_logps(self.model, on_device, self.lm_head_chunk, tokens=True)
                    batch["old_logp"] = padded_tokens(out["token_logps"], on_device["score_seq"], n)[0].float().cpu()
                if self.objective["beta"] > 0:
                    batch["ref_logp"] = self._reference_token_logps(on_device, n).cpu()
        finally:
            self.model.train(was_training)
        return batch

    def _reference_token_logps(self, batch: dict, n: int) -> torch.Tensor:
        """The reference's per-token log-probs [N, T]: ref_model, or the policy with its adapter off."""
        out = reference.outputs(self.model, batch, self.ref_model, self.lm_head_chunk, precomputed=False, tokens=True)
        return padded_tokens(out["token_logps"], batch["score_seq"], n)[0].float()

    def _record_sampling(self, stats: dict, rewards: torch.Tensor, groups: list) -> None:
        """The sampled groups' metrics, under TRL's names."""
        eos = self.processing_class.eos_token_id
        lengths = torch.tensor([float(len(c)) for g in groups for c in g])
        cut = torch.tensor([float(len(c) >= self.max_completion_length and c[-1] != eos) for g in groups for c in g])
        self._record(  # on the device: under DDP the metrics are reduced over the processes
            {
                k: v.to(self.args.device)
                for k, v in {
                    **stats,
                    f"rewards/{self.reward_name}/mean": rewards.mean(),
                    f"rewards/{self.reward_name}/std": grpo._std(rewards.reshape(-1), 0),
                    "completions/mean_length": lengths.mean(),
                    "completions/min_length": lengths.min(),
                    "completions/max_length": lengths.max(),
                    "completions/clipped_ratio": cut.mean(),
                }.items()
            },
            "train",
        )

    # ---- the loss ----

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The GRPO loss of one sampled micro-batch (grpo.policy_loss); logs its metrics."""
        out = sequence_logps(model, inputs, self.lm_head_chunk, tokens=True)
        n = int(inputs["n_seqs"])
        logp, mask = padded_tokens(out["token_logps"], inputs["score_seq"], n)
        loss, metrics = grpo.policy_loss(
            logp,
            inputs.get("old_logp"),
            inputs.get("ref_logp"),
            inputs["advantages"].to(logp.dtype),
            mask,
            num_items_in_batch=num_items_in_batch if self.objective["loss_type"] == "dapo" else None,
            **self.objective,
        )
        metrics.pop("completions/mean_length")  # recorded when sampled, with the other lengths
        # what one row per prompt saves: its tokens computed once for G completions, not G times
        prompt_tokens = ((inputs["branch_ids"] == 0) & (inputs["doc_ids"] >= 0)).sum().float()
        metrics["prefix_sharing/tokens_saved"] = prompt_tokens * (self.num_generations - 1)
        self._record(metrics, "train" if model.training else "eval")
        return (loss, {"logp": logp.detach(), "mask": mask}) if return_outputs else loss

    # ---- the sampled batch of a cycle, in checkpoints ----

    def save_process_state(self, folder: Path) -> None:
        """With μ > 1, this process's sampled micro-batches of the cycle (a resumed run reuses them
        as the uninterrupted one does)."""
        if self.num_iterations == 1 or self._batches is None:
            return
        tensors = {f"{i}/{k}": v.contiguous() for i, b in enumerate(self._batches) for k, v in b.items()}
        path = folder / BUFFER_FILE.format(rank=self.accelerator.process_index)
        save_file(tensors, str(path), metadata={"step": json.dumps(self._batches_step)})

    def restore_extra_state(self, checkpoint: Path) -> None:
        """This process's sampled micro-batches saved by save_process_state, if any."""
        path = checkpoint / BUFFER_FILE.format(rank=self.accelerator.process_index)
        if self.num_iterations == 1 or not path.is_file():
            return
        batches: dict[int, dict] = {}
        with safe_open(str(path), "pt") as f:  # the tensors and the step that sampled them, one read
            for key in f.keys():
                i, name = key.split("/", 1)
                batches.setdefault(int(i), {})[name] = f.get_tensor(key)
            self._batches_step = json.loads(f.metadata()["step"])
        self._batches = [batches[i] for i in sorted(batches)]


def disable_dropout(model) -> None:
    """Every dropout of `model` (its own, a LoRA adapter's) set to 0, as TRL's disable_dropout: the
    completions are sampled, and their old log-probs taken, without dropout, so the training
    forward must match them (a ratio of exactly 1 on a batch's first step)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _as_list(prompts: list[dict]) -> list[dict]:
    """The data collator: a batch of prompts stays a list (they are sampled from, not collated)."""
    return prompts


def _seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The sampling seed of one micro-batch: a hash of the run's seed, the optimizer step, the
    micro-batch and the process, in [0, 2**63)."""
    digest = hashlib.blake2b(f"{seed}/{step}/{micro}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class RepeatedBlocks(Sampler):
    """Indices of a dataset of `n` items in a seeded random order per epoch, cut into blocks of
    `block` (one optimizer step's prompts over all processes), each block given `repeats` times in
    a row. A last block that would be short is filled from the start of the order, so every step
    gets a whole block and an epoch is a whole number of cycles. The order depends only on the
    seed and the epoch (transformers calls set_epoch)."""

    def __init__(self, n: int, block: int, repeats: int, seed: int):
        self.n, self.block, self.repeats, self.seed, self.epoch = n, block, repeats, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        blocks = -(-self.n // self.block)
        order = (order * (-(-blocks * self.block // self.n)))[: blocks * self.block]
        for s in range(0, len(order), self.block):
            for _ in range(self.repeats):
                yield from order[s : s + self.block]

    def __len__(self) -> int:
        return -(-self.n // self.block) * self.block * self.repeats
