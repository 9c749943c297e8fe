"""A transformers.Trainer whose loss is a preference loss: compute_loss and metrics, nothing else.

The optimiser, schedule, accumulation, mixed precision, checkpoints and DDP/FSDP/DeepSpeed all
stay transformers'/accelerate's. Metrics use the names TRL users know.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Optional, Union

import torch
from accelerate.utils import AutocastKwargs, DistributedType
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_utils import get_last_checkpoint

from prefopt import losses
from prefopt.config import moving_reference_precompute_error, token_subset_conflict_error
from prefopt.data import formats
from prefopt.data.collate import Collator, subset_mode
from prefopt.data.examples import check_shape
from prefopt.data.tokenize import attach_kl_completions, tokenize_pairs
from prefopt.errors import PrefoptError
from prefopt.modeling import load, reference
from prefopt.modeling.logprobs import sequence_logps
from prefopt.modeling.sparse_embedding import sparse_tied_embedding_grads
from prefopt.training import checkpoints

log = logging.getLogger("prefopt")

LENGTH_CORR_SEQS = 512  # sequences behind rewards/length_corr
LOSS_STATE_FILE = "prefopt_loss_state.json"  # in a checkpoint: the state a stateful loss keeps across steps
REFERENCE_FILE = "prefopt_reference.safetensors"  # in a checkpoint: a moving reference's changed weights


def as_examples(data, *, tokenizer, spec: losses.LossSpec, seed: int, max_length: int, max_prompt_length: int):
    """Training examples from `data`: tokenized examples (from prefopt's tokenizer: they carry
    prompt_ids) as they are; records in any shape prefopt reads (a datasets.Dataset, a DatasetDict's
    split, a list of dicts) read, checked and tokenized with `tokenizer`; None stays None."""
    if data is None:
        return None
    if type(data).__name__ in ("DatasetDict", "IterableDatasetDict"):
        raise PrefoptError(
            f"PreferenceTrainer: give one split of the DatasetDict (its splits: {', '.join(data)}), "
            "e.g. train_dataset=dd['train'], eval_dataset=dd['test']."
        )
    first = next(iter(data), None)
    if isinstance(first, dict) and "prompt_ids" in first:
        return list(data)
    if tokenizer is None:
        raise PrefoptError(
            "PreferenceTrainer: the dataset holds records, not tokenized examples; pass "
            "processing_class= (the tokenizer) so they can be tokenized."
        )
    loaded = formats.load(data)
    check_shape(spec, loaded.shape, formats.describe_source(data))
    examples, _ = tokenize_pairs(loaded.items, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
    if spec.kl_baseline:
        attach_kl_completions(examples, seed)
    return examples


def _model_and_tokenizer(model, tokenizer, peft_config):
    """(the model to train, its tokenizer): `model` a model object or a name (hub id, folder, .gguf,
    "default": loaded, with its tokenizer unless one is given); wrapped by peft with `peft_config`."""
    if isinstance(model, str):
        path = load.resolve(model)
        model = load.load_model(path)
        tokenizer = tokenizer or load.load_tokenizer(path)
    if peft_config is not None:
        model = load.peft_model(model, peft_config)
    return model, tokenizer


def _check_modifiers(loss: losses.LossSpec, ld_alpha, wpo, precompute_reference) -> None:
    """An error for modifiers and settings that `loss` cannot take."""
    if (ld_alpha is not None or wpo) and not loss.paired:
        raise ValueError(f"ld_alpha / wpo modify paired losses; '{loss.name}' is unpaired")
    if ld_alpha is not None and loss.token_subset is not None:
        raise PrefoptError(
            "PreferenceTrainer: " + token_subset_conflict_error(loss.name, loss.token_subset, "ld_alpha", "give one")
        )
    if loss.moving_reference and precompute_reference:
        raise PrefoptError(
            "PreferenceTrainer: "
            + moving_reference_precompute_error(
                loss.name, "precompute_reference", "pass precompute_reference=False, or leave it out"
            )
        )


def _split(x, K: int):
    """Rows interleaved in groups of K -> (first of each group, second of each group or None)."""
    if x is None:
        return None, None
    return x[0::K], (x[1::K] if K == 2 else None)


class RunTrainer(Trainer):
    """What every prefopt trainer adds to transformers.Trainer, whatever its loss: checkpoints
    written aside and published whole, and only when every weight and optimizer moment is finite;
    the run's identity (`run_info`) in each; a trainer's own state beyond transformers' saved with
    each checkpoint and restored on resume (`save_extra_state` / `restore_extra_state`); the model
    as safetensors with its training arguments as JSON (no pickle); metrics averaged over the
    global batch (`_record`) and logged with the names TRL users know."""

    def _init_run_state(self, run_info: Optional[dict]) -> None:
        """The state every prefopt trainer keeps, and the settings it applies to the accelerator/model."""
        self.run_info = run_info  # saved in every checkpoint (checkpoints.RUN_FILE); None: nothing saved
        self.nonfinite_step: Optional[int] = None  # a save step whose weights or moments were not finite
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        # bf16 autocast without its weight-cast cache: each weight is used once per forward, so the
        # cache saves no work, but it keeps a bf16 copy of every weight until the forward ends, and
        # under activation checkpointing (nothing else holds those copies) that is ~0.1 GB of peak
        # RSS for SmolLM2-135M (measured; the maths is unchanged)
        self.accelerator.autocast_handler = AutocastKwargs(cache_enabled=False)
        if self.accelerator.distributed_type == DistributedType.NO:  # see sparse_embedding.py
            sparse_tied_embedding_grads(self.model)

    def save_extra_state(self, folder: Path) -> None:
        """Write what this trainer keeps beyond transformers' state into the checkpoint `folder`."""

    def save_process_state(self, folder: Path) -> None:
        """Write what each process keeps of its own into the checkpoint `folder` (every process calls it)."""

    def restore_extra_state(self, checkpoint: Path) -> None:
        """Read back what save_extra_state and save_process_state wrote into `checkpoint`."""

    def _record(self, stats: dict, split_name: str) -> None:
        """Means over the global batch from one reduction of (sum, count) per metric: a rank's
        batch may hold no desirable (or no undesirable) example, so sizes differ between ranks."""
        keys = list(stats)
        sums = torch.stack([stats[k].detach().float().sum() for k in keys])
        counts = torch.tensor([float(stats[k].numel()) for k in keys], device=sums.device)
        totals = torch.stack([sums, counts])
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, "sum")
        for k, total, n in zip(keys, *totals.tolist()):
            if n:
                self._metrics[split_name][k].append(total / n)

    # ---- checkpoints: atomic, and no pickle ----

    def _save_checkpoint(self, model, trial):
        """transformers' checkpoint, written into OUT/.partial and renamed into place only when
        complete (see prefopt.training.checkpoints) — and only when every weight and optimizer
        moment is finite: a non-finite state is never published; training stops instead."""
        if not self.state_is_finite():
            self.nonfinite_step = self.state.global_step
            self.control.should_training_stop = True
            return
        run_dir = self.args.output_dir
        name = f"{checkpoints.PREFIX}{self.state.global_step}"
        staging = os.path.join(run_dir, checkpoints.STAGING)
        if self.args.should_save:
            checkpoints.clear_staging(run_dir)
        self.accelerator.wait_for_everyone()
        keep, self.args.save_total_limit = self.args.save_total_limit, None
        self.args.output_dir = staging
        try:
            super()._save_checkpoint(model, trial)
            self.save_process_state(Path(staging) / name)
            if self.args.should_save:
                self._save_prefopt_state(Path(staging) / name)
        finally:
            self.args.output_dir, self.args.save_total_limit = run_dir, keep
        self.accelerator.wait_for_everyone()  # every rank's files (RNG states, shards) are written
        if self.args.should_save:
            checkpoints.publish(Path(staging) / name, Path(run_dir) / name)
            checkpoints.prune(run_dir, keep or 0)
            checkpoints.clear_staging(run_dir)
        self.accelerator.wait_for_everyone()

    def _save_prefopt_state(self, folder: Path) -> None:
        """What transformers does not save: the trainer's own state (save_extra_state) and the run's
        identity (its config and data fingerprint, checked by --resume) with the verified-finite mark."""
        self.save_extra_state(folder)
        if self.run_info is not None:
            (folder / checkpoints.RUN_FILE).write_text(json.dumps({**self.run_info, "finite": True}))

    @torch.no_grad()
    def state_is_finite(self) -> bool:
        """Whether every trainable weight and every optimizer moment is finite, on every process."""
        tensors = [p for p in self.model.parameters() if p.requires_grad]
        if self.optimizer is not None:
            tensors += [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        bad = torch.zeros((), device=self.args.device)
        for x in tensors:
            if type(x) is not torch.Tensor and hasattr(x, "dequantize"):
                x = x.dequantize()  # a quantized moment (torchao's 8-bit, 4-bit, fp8 AdamW): its values
            if x.is_floating_point():
                bad = bad + (~torch.isfinite(x)).any().to(bad.device, bad.dtype)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, "sum")
        return bad.item() == 0

    def restore_state(self, checkpoint) -> None:
        """What _save_prefopt_state saved in `checkpoint` (restore_extra_state)."""
        self.restore_extra_state(Path(checkpoint))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """transformers' train(); when resuming, prefopt's own state is restored first (restore_state)."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, (str, os.PathLike)):
            self.restore_state(checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save(self, output_dir=None, state_dict=None):
        """The model as safetensors (transformers' own save) and the training arguments as JSON
        instead of the pickled training_args.bin, which nothing here reads."""
        super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            pickled = Path(output_dir) / "training_args.bin"
            if pickled.exists():
                pickled.unlink()
            (Path(output_dir) / "training_args.json").write_text(self.args.to_json_string())

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        """transformers' log, with the means of the metrics recorded since the last one."""
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if split == "eval" else ""
        for k, v in self._metrics[split].items():
            if v:
                logs[prefix + k] = round(sum(v) / len(v), 6)
        self._metrics[split].clear()
        super().log(logs, start_time)


class PreferenceTrainer(RunTrainer):
    """A transformers.Trainer whose loss is `loss` (a registered name or a LossSpec) with
    hyperparameters `loss_kwargs` (the loss's defaults for those not given). Used the way TRL's
    DPOTrainer is: `PreferenceTrainer(model, args, train_dataset=records, processing_class=tokenizer,
    peft_config=LoraConfig(...), loss="sigmoid", loss_kwargs={"beta": 0.1})` — `model` a model or
    a name, `records` in any shape prefopt reads (tokenized here, cut to `max_length` /
    `max_prompt_length`), reference log-probs computed once before the first step (unless
    `precompute_reference` is false: then a frozen `ref_model`, or the policy with its adapter off).

    The reference is the batch's precomputed `ref_logps`, `ref_model` (a frozen copy), or the
    policy with its adapter off. A loss whose reference moves (`LossSpec.moving_reference`, TR-DPO)
    never precomputes (None: the default; True is an error): its reference is `ref_model` (updated in
    place), or a copy of the policy made here (of a peft model: its base model), softly updated
    towards the policy every `tr_tau` optimizer steps (reference.MovingReference) and saved in
    checkpoints.

    `ld_alpha` (LD-DPO; None = off) and `wpo` (WPO pair weights, capped at `wpo_clamp`; None =
    uncapped) modify a paired loss. LD-DPO, and a loss that scores a token subset
    (`LossSpec.token_subset`, SamPO), need batches from a Collator built with that subset (the
    default collator is), carrying ref_subset_logps when the reference log-probs are precomputed."""

    def __init__(
        self,
        model=None,
        args: Optional[TrainingArguments] = None,
        *,
        loss: Union[str, losses.LossSpec] = "sigmoid",
        loss_kwargs: Optional[dict] = None,
        ref_model=None,
        peft_config=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        data_collator=None,
        max_length: int = 512,
        max_prompt_length: int = 256,
        lm_head_chunk: int = 1024,
        ld_alpha: Optional[float] = None,
        wpo: bool = False,
        wpo_clamp: Optional[float] = 1.0,
        run_info: Optional[dict] = None,
        precompute_reference: Optional[bool] = None,
        **kwargs,
    ):
        loss = losses.get(loss) if isinstance(loss, str) else loss
        _check_modifiers(loss, ld_alpha, wpo, precompute_reference)
        loss_kwargs = {**loss.hyperparameters, **(loss_kwargs or {})}
        model, processing_class = _model_and_tokenizer(model, processing_class, peft_config)
        args = args or TrainingArguments(output_dir="runs/prefopt", report_to="none")
        args.remove_unused_columns = False  # batches are prefopt's rows, not forward() arguments
        prepare = dict(
            tokenizer=processing_class,
            spec=loss,
            seed=args.seed,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
        )
        train_dataset, eval_dataset = as_examples(train_dataset, **prepare), as_examples(eval_dataset, **prepare)
        if data_collator is None and processing_class is not None:
            subset = subset_mode(loss.token_subset, ld_alpha)
            data_collator = Collator(processing_class.pad_token_id, subset=subset, seed=args.seed)
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            data_collator=data_collator,
            **kwargs,
        )
        self.loss_spec, self.loss_kwargs, self.ref_model = loss, dict(loss_kwargs), ref_model
        self.lm_head_chunk, self.ld_alpha, self.wpo, self.wpo_clamp = lm_head_chunk, ld_alpha, bool(wpo), wpo_clamp
        self.moving_reference: Optional[reference.MovingReference] = None
        if loss.moving_reference:
            ref_model = self._start_moving_reference(ref_model)
        self._init_state(run_info)
        if ref_model is not None:
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        elif loss.needs_reference and precompute_reference is not False and not loss.moving_reference:
            self._precompute_reference()

    def _start_moving_reference(self, ref_model):
        """The moving reference (TR-DPO): `ref_model` as given, or a frozen copy of the policy as it
        is now; updated every tr_tau optimizer steps by a callback. Returns the reference model."""
        if self.is_fsdp_enabled or is_deepspeed_zero3_enabled():
            raise PrefoptError(
                f"loss '{self.loss_spec.name}' keeps a whole copy of the reference and mixes the policy's weights "
                "into it, but FSDP and DeepSpeed ZeRO-3 shard those weights; use DDP, or DeepSpeed ZeRO-1/2."
            )
        ref_model = ref_model if ref_model is not None else reference.frozen_copy(self.model)
        self.moving_reference = reference.MovingReference(ref_model, self.model)
        self.add_callback(_SyncReference(self))
        return ref_model

    def sync_reference(self, step: int) -> bool:
        """After optimizer step `step`: every tr_tau-th step, the soft update of the moving reference
        with α = tr_alpha (reference.MovingReference.update). Returns whether it updated."""
        if self.moving_reference is None or step % int(self.loss_kwargs["tr_tau"]):
            return False
        self.moving_reference.update(float(self.loss_kwargs["tr_alpha"]))
        return True

    def _init_state(self, run_info: Optional[dict]) -> None:
        """What the trainer keeps across steps (RunTrainer's, and the loss's)."""
        self._init_run_state(run_info)
        self.loss_state = self._new_loss_state()
        # (implicit rewards, lengths) of recently trained batches, kept on the device (no sync per
        # step); rewards/length_corr is computed over their last LENGTH_CORR_SEQS sequences at log time
        self._reward_length: deque = deque(maxlen=LENGTH_CORR_SEQS)
        # real (non-pad) tokens trained on since the last log, for throughput/tokens_per_s
        self._tokens = torch.zeros((), dtype=torch.long)
        self._tokens_since = None
        # Our loss is a mean over the pairs of a micro-batch: the Trainer must divide by the number
        # of accumulation steps (1 × 8 accumulated == 8 × 1), never rescale by token counts.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False

    def _precompute_reference(self) -> None:
        """Reference log-probs for examples that lack them, from the model as it is now (it is the
        reference before the first step; a peft model's adapter is turned off): one model in memory."""
        lacking = [
            ex
            for ex in (self.train_dataset, self.eval_dataset)
            if isinstance(ex, list) and ex and "ref_logps" not in ex[0]
        ]
        reference.precompute_for_training(
            self.model,
            lacking,
            self.data_collator,
            self.args,
            cache_dir=None,
            chunk=self.lm_head_chunk,
            progress=not self.args.disable_tqdm,
        )

    def _loss_logps(self, out: dict) -> torch.Tensor:
        """The per-sequence log-probs the loss sees: with LD-DPO, prefix + ld_alpha·excess; for a loss
        that scores a token subset (SamPO), the subset's sums; else the plain sums."""
        if self.ld_alpha is None and self.loss_spec.token_subset is None:
            return out["logps"]
        if "subset_logps" not in out:
            raise RuntimeError(
                "LD-DPO (ld_alpha) and token-subset losses (SamPO) need batches from a Collator built with "
                "their subset (and precomputed reference log-probs with ref_subset_logps)"
            )
        subset = out["subset_logps"].to(out["logps"].dtype)
        if self.ld_alpha is None:
            return subset
        return losses.ld_logps(subset, out["logps"] - subset, self.ld_alpha)

    def _hyper(self, training: bool) -> dict:
        """The loss's hyperparameters: this run's, with the spec's `eval_hyperparameters` on top in
        evaluation (β-DPO keeps every pair there: no random draw, no training RNG consumed)."""
        if training or not self.loss_spec.eval_hyperparameters:
            return self.loss_kwargs
        return {**self.loss_kwargs, **self.loss_spec.eval_hyperparameters}

    def _new_loss_state(self):
        """A fresh state of a stateful loss (None for the others). Under data parallelism its update
        folds in the values gathered from every process, so all keep the same state (the
        single-process one for the same global batch)."""
        if self.loss_spec.state_class is None:
            return None
        state = self.loss_spec.state_class()
        if self.accelerator.num_processes > 1:
            state.gather = self.accelerator.gather
        return state

    def _loss_state_for(self, training: bool):
        """The state the loss takes: the running one in training; in evaluation a copy, which the
        evaluation batch advances and which is then dropped."""
        if training or self.loss_state is None:
            return self.loss_state
        return self.loss_state.copy()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The batch's mean preference loss (WPO-weighted when on); logs its metrics."""
        out = sequence_logps(model, inputs, self.lm_head_chunk, sq_mass=self.wpo)
        if model.training:
            self._count_tokens(inputs)
        ref = None
        if self.loss_spec.needs_reference:
            precomputed = not self.loss_spec.moving_reference
            ref_out = reference.outputs(model, inputs, self.ref_model, self.lm_head_chunk, precomputed=precomputed)
            ref = self._loss_logps(ref_out).to(out["logps"].dtype)
        logps = self._loss_logps(out)
        extra = dict(self._hyper(model.training))  # the hyperparameters, then the state
        if self.loss_state is not None:  # evaluation uses the running state without advancing it
            extra["state"] = self._loss_state_for(model.training)
        if self.loss_spec.paired:
            per_example, weights, stats = self._paired(model, out, logps, ref, extra)
        else:
            per_example, stats = self._unpaired(inputs, out, logps, ref, extra)
            weights = None
        loss = (per_example if weights is None else weights * per_example).mean()
        self._record(stats, "train" if model.training else "eval")
        if return_outputs:
            # what the loss saw, for inspection: the (LD- or subset-) log-probs, the per-example losses
            # and the WPO weights (None when off)
            out = {
                **out,
                "loss_logps": logps.detach(),
                "loss_ref_logps": None if ref is None else ref.detach(),
                "per_example": per_example.detach(),
                "wpo_weights": weights,
            }
            return loss, out
        return loss

    def _count_tokens(self, inputs) -> None:
        """Real (non-pad) tokens trained on, for throughput/tokens_per_s."""
        if self._tokens_since is None:
            self._tokens_since = time.perf_counter()
        self._tokens = self._tokens.to(inputs["doc_ids"].device) + (inputs["doc_ids"] >= 0).sum()

    def _paired(self, model, out: dict, logps, ref, extra: dict):
        """(per-pair losses, WPO weights or None, metrics) of a batch of (chosen, rejected) rows."""
        (logp_c, logp_r), (len_c, len_r), (ref_c, ref_r) = _split(logps, 2), _split(out["lengths"], 2), _split(ref, 2)
        per_example = self.loss_spec.fn(logp_c, logp_r, ref_c, ref_r, len_c=len_c, len_r=len_r, **extra)
        stats = self._pair_stats(logp_c, logp_r, ref_c, ref_r, len_c, len_r)
        if model.training and ref is not None:
            self._reward_length.append(
                torch.stack(
                    [
                        torch.cat([stats["rewards/chosen"], stats["rewards/rejected"]]).float(),
                        torch.cat([len_c, len_r]).float(),
                    ]
                )
            )
        weights = None
        if self.wpo:  # the policy's own (plain, not LD) per-token probabilities, weight-aligned
            (raw_c, raw_r), (sq_c, sq_r) = _split(out["logps"], 2), _split(out["sq_mass"], 2)
            weights = losses.wpo_weights(
                raw_c, raw_r, len_c, len_r, sq_mass_c=sq_c, sq_mass_r=sq_r, clamp_max=self.wpo_clamp
            )
            stats["wpo/weights"] = weights
        return per_example, weights, stats

    def _unpaired(self, inputs, out: dict, logps, ref, extra: dict):
        """(per-example losses, metrics) of a batch of labelled completions. Rows come in twos —
        (completion, mismatched completion for the KL baseline) — or alone (no KL baseline)."""
        label = inputs["labels_bool"]
        K = out["logps"].shape[0] // label.shape[0]
        (logp, kl_logp), (length, _), (ref_a, kl_ref) = _split(logps, K), _split(out["lengths"], K), _split(ref, K)
        if self.accelerator.num_processes > 1 and kl_ref is not None:  # z0 from the global batch
            kl_logp = self.accelerator.gather(kl_logp.detach())
            kl_ref = self.accelerator.gather(kl_ref)
        per_example = self.loss_spec.fn(logp, ref_a, label, kl_logp=kl_logp, kl_ref_logp=kl_ref, len=length, **extra)
        return per_example, self._unpaired_stats(label, logp, ref_a, length, kl_logp, kl_ref)

    def rewards(self, logps, ref, lengths):
        """The implicit rewards of responses (losses.implicit_rewards with this run's loss)."""
        return losses.implicit_rewards(self.loss_spec, self.loss_kwargs, logps, ref, lengths)

    @torch.no_grad()
    def _pair_stats(self, logp_c, logp_r, ref_c, ref_r, len_c, len_r) -> dict:
        reward_c, reward_r = self.rewards(logp_c, ref_c, len_c), self.rewards(logp_r, ref_r, len_r)
        stats = {
            "rewards/chosen": reward_c,
            "rewards/rejected": reward_r,
            "rewards/margins": reward_c - reward_r,
            "rewards/accuracies": (reward_c > reward_r).float(),
            "logps/chosen": logp_c,
            "logps/rejected": logp_r,
            "lengths/chosen": len_c,
            "lengths/rejected": len_r,
        }
        if ref_c is not None:
            stats["logps/ref_chosen"], stats["logps/ref_rejected"] = ref_c, ref_r
        return stats

    @torch.no_grad()
    def _unpaired_stats(self, label, logp, ref, length, kl_logp, kl_ref) -> dict:
        reward = self.rewards(logp, ref, length)
        stats = {
            "rewards/desirable": reward[label],
            "rewards/undesirable": reward[~label],
            "logps/desirable": logp[label],
            "logps/undesirable": logp[~label],
            # accuracy of the implicit reward's sign against the labels
            "rewards/accuracies": ((reward > 0) == label).float(),
        }
        if kl_ref is not None:
            stats["kl"] = (kl_logp - kl_ref).mean().clamp(min=0)[None]  # KL over the global batch
        return stats

    def save_extra_state(self, folder: Path) -> None:
        """A stateful loss's state (its to_dict()) and a moving reference's changed weights."""
        if self.loss_state is not None:
            (folder / LOSS_STATE_FILE).write_text(json.dumps(self.loss_state.to_dict()))
        if self.moving_reference is not None:
            save_file(self.moving_reference.state_dict(), str(folder / REFERENCE_FILE))

    def restore_extra_state(self, checkpoint: Path) -> None:
        """What _save_prefopt_state saved in `checkpoint`: the stateful loss's state (also a BCO
        state saved by earlier versions, {"mean", "count"}) and the moving reference's weights."""
        if self.loss_state is not None and (checkpoint / LOSS_STATE_FILE).is_file():
            self.loss_state.load_dict(json.loads((checkpoint / LOSS_STATE_FILE).read_text()))
        if self.moving_reference is None:
            return
        if (checkpoint / REFERENCE_FILE).is_file():
            try:
                self.moving_reference.load_state_dict(load_file(str(checkpoint / REFERENCE_FILE)))
            except ValueError as e:  # another model or LoRA layout (a resume with --force)
                raise PrefoptError(
                    f"{checkpoint / REFERENCE_FILE}: {e}; the checkpoint's moving reference does not fit this "
                    "run's model (another model, or other lora.target_modules). Resume with the checkpoint's "
                    "settings, or start a new run."
                ) from None
        else:  # a checkpoint of a run with another loss, resumed with --force
            log.warning("%s holds no %s; the moving reference starts from the model", checkpoint, REFERENCE_FILE)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        """RunTrainer's log, with rewards/length_corr and throughput/tokens_per_s in training."""
        if not any(k.startswith("eval_") for k in logs):
            if self._reward_length:
                r, n = torch.cat(list(self._reward_length), 1)[:, -LENGTH_CORR_SEQS:].cpu()
                if r.numel() >= 16 and r.std() > 0 and n.std() > 0:
                    logs["rewards/length_corr"] = round(torch.corrcoef(torch.stack([r, n]))[0, 1].item(), 4)
            if "loss" in logs and self._tokens_since is not None:
                tokens = self.accelerator.reduce(self._tokens.clone(), "sum").item()  # all ranks
                logs["throughput/tokens_per_s"] = round(tokens / max(time.perf_counter() - self._tokens_since, 1e-9), 1)
                self._tokens.zero_()
                self._tokens_since = time.perf_counter()
        super().log(logs, start_time)


class _SyncReference(TrainerCallback):
    """After each optimizer step: the trainer's moving-reference update (PreferenceTrainer.sync_reference)."""

    def __init__(self, trainer: PreferenceTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.sync_reference(state.global_step)


class JsonlMetrics(TrainerCallback):
    """Append every log entry (with its step) to OUT/metrics.jsonl."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")
