"""Reward-driven experiments on a prompt set: sample from a model, score with a reward function,
build preference pairs, train a LoRA adapter, measure reward and KL on held-out prompts.

`prefopt demo`, `prefopt frontier` (a grid of losses × β) and `prefopt rounds` (on-policy
iterations) are this loop with different settings. An experiment config (YAML):

    model: default                  # as in a training config
    prompts: sentiment              # built-in movie-review openings | code (the code task's split) | a .txt/.jsonl file
    reward: vader                   # prefopt.evaluation.rewards: vader | length | regex: | keywords: | module:fn
    train_prompts: 200              # the first N (shuffled with seed) train, the last eval_prompts evaluate
    eval_prompts: 40
    samples: 8                      # responses per training prompt; best vs worst (or RSO) make pairs
    eval_samples: 4
    max_new_tokens: 32
    pairs: best_vs_worst            # best_vs_worst | rso (rejection sampling toward π_ref·exp(r/β))
    loss: sigmoid                   # for rounds; frontier uses grid
    beta: 0.1
    grid: {sigmoid: [0.05, 0.1, 0.3], ipo: [0.25, 1.0], ...}   # frontier: loss -> betas (default: docs/frontier.csv's)
    loss_options: {tr_dpo: {tr_tau: 5}}   # loss -> its other hyperparameters (loss: keys)
    rounds: 2                       # rounds: on-policy iterations
    lr: 4.0e-4
    epochs: 1.0
    batch_size: 8
    lora_r: 16
    lora_alpha: 32
    seed: 0
    out: runs/experiment
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

import torch

from prefopt import config, losses
from prefopt.config import (
    Config,
    GRPOConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    TrainConfig,
    complete,
    read_yaml,
    resolve_loss,
    set_keys,
)
from prefopt.data.tokenize import attach_kl_completions
from prefopt.errors import PrefoptError
from prefopt.evaluation import rewards
from prefopt.evaluation.generation import generation_eval
from prefopt.modeling import load, reference
from prefopt.modeling.sampling import sample
from prefopt.tasks import prompt_sets
from prefopt.training.setup import make_collator, make_trainer, seed_everything, use_bf16

log = logging.getLogger("prefopt")


@dataclass
class ExperimentConfig:
    model: str = "default"
    prompts: str = "sentiment"
    reward: str = "vader"
    train_prompts: int = 200
    eval_prompts: int = 40
    samples: int = 8
    eval_samples: int = 4
    max_new_tokens: int = 32
    pairs: str = "best_vs_worst"
    loss: str = "sigmoid"
    beta: float = 0.1
    # the grid behind docs/frontier.png
    grid: dict = field(
        default_factory=lambda: {
            "sigmoid": [0.05, 0.1, 0.3],
            "ipo": [0.25, 1.0],
            "simpo": [2.5, 10.0],
            "kto": [0.1, 0.3],
            "dpop": [0.1],
            "cal_dpo": [0.1],
            "sampo": [0.1],
            "beta_dpo": [0.1],
            "tr_dpo": [0.1],
            "alphapo": [2.5],
        }
    )
    # loss -> its other hyperparameters in the runs of that loss (the frontier's 25 steps: the
    # reference of TR-DPO moves every 5)
    loss_options: dict = field(default_factory=lambda: {"tr_dpo": {"tr_tau": 5}})
    rounds: int = 2
    lr: float = 4e-4
    epochs: float = 1.0
    batch_size: int = 8
    lora_r: int = 16
    lora_alpha: int = 32
    seed: int = 0
    out: str = "runs/experiment"
    progress: bool = True

    @classmethod
    def quick(cls, **kw) -> "ExperimentConfig":
        """A tiny run that checks the machinery (not a result)."""
        base = dict(
            train_prompts=12,
            eval_prompts=4,
            samples=2,
            eval_samples=2,
            max_new_tokens=8,
            batch_size=4,
            grid={"sigmoid": [0.1], "kto": [0.1]},
        )
        return cls(**{**base, **kw})


def load_config(path: Optional[str], overrides: Optional[dict] = None) -> ExperimentConfig:
    raw, source = read_yaml(path or None)
    if not isinstance(raw, dict):
        raise PrefoptError(f"{source}: expected a mapping of keys, found {type(raw).__name__}.")
    cfg = ExperimentConfig()
    set_keys(cfg, {**raw, **(overrides or {})}, source)
    validate(cfg, source)
    return cfg


def validate(cfg: ExperimentConfig, source: str = "config") -> None:
    def bad(key, msg):
        raise PrefoptError(f"{source}: '{key}' {msg}")

    rewards.get(cfg.reward)  # a clear error now, not after sampling
    for key in (
        "train_prompts",
        "eval_prompts",
        "samples",
        "eval_samples",
        "max_new_tokens",
        "batch_size",
        "lora_r",
        "lora_alpha",
        "rounds",
    ):
        if getattr(cfg, key) < 1:
            bad(key, f"must be >= 1, found {getattr(cfg, key)}.")
    if cfg.samples < 2:
        bad("samples", "must be >= 2: a pair needs two responses to the same prompt.")
    if cfg.pairs not in ("best_vs_worst", "rso"):
        bad("pairs", f"must be best_vs_worst or rso, found '{cfg.pairs}'.")
    for name in [cfg.loss, *cfg.grid]:
        if losses.ALIASES.get(name, name) not in losses.names():
            bad("loss" if name == cfg.loss else f"grid.{name}", f"is not a loss; known: {', '.join(losses.names())}.")
    for name, betas in cfg.grid.items():
        if not isinstance(betas, list) or not betas or not all(isinstance(b, (int, float)) and b > 0 for b in betas):
            bad(f"grid.{name}", f"must be a list of positive betas, found {betas!r}.")
    known = {f.name for f in fields(LossConfig)} - {"name", "beta"}
    if not isinstance(cfg.loss_options, dict):
        bad("loss_options", f"must map a loss to its hyperparameters, found {cfg.loss_options!r}.")
    for name, options in cfg.loss_options.items():
        if not isinstance(options, dict) or not set(options) <= known:
            bad(
                f"loss_options.{name}",
                f"must map loss keys ({', '.join(sorted(known))}) to values, found {options!r}.",
            )
    if cfg.beta <= 0 or cfg.lr <= 0 or cfg.epochs <= 0:
        bad("beta/lr/epochs", "must be > 0.")


class Experiment:
    """The loaded model, tokenizer, prompts and reward of an experiment, and its steps."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        seed_everything(cfg.seed)
        self.reward = rewards.get(cfg.reward)
        self.path = load.resolve(cfg.model)
        self.tokenizer = load.load_tokenizer(self.path)
        self.train_text, self.eval_text = self._split_prompts()
        self.train_ids, self.eval_ids = self.encode(self.train_text), self.encode(self.eval_text)
        self.bf16 = use_bf16("auto")
        self.autocast = torch.bfloat16 if self.bf16 else None
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._ref_eval_samples = None

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens."""
        return [self.tokenizer(text, add_special_tokens=False).input_ids for text in texts]

    def _split_prompts(self) -> tuple[list[str], list[str]]:
        """(training prompts, held-out prompts): `train_prompts` and `eval_prompts` of the prompt
        set (prefopt.tasks.prompt_sets), shuffled with the seed — from its fixed train and held-out
        parts where it has them (the code task), else the first and the last of one shuffled list."""
        cfg = self.cfg
        found = prompt_sets.load(cfg.prompts, self.tokenizer)
        rng = random.Random(cfg.seed)
        if found.heldout is not None:
            train, heldout = list(found.train), list(found.heldout)
            for name, key, texts, want in (
                ("train", "train_prompts", train, cfg.train_prompts),
                ("held-out", "eval_prompts", heldout, cfg.eval_prompts),
            ):
                if len(texts) < want:
                    raise PrefoptError(f"prompts '{cfg.prompts}': {len(texts)} {name} prompts, but {key} = {want}.")
            rng.shuffle(train)
            rng.shuffle(heldout)
            return train[: cfg.train_prompts], heldout[: cfg.eval_prompts]
        texts = list(found.train)
        need = cfg.train_prompts + cfg.eval_prompts
        if len(texts) < need:
            raise PrefoptError(
                f"prompts '{cfg.prompts}': {len(texts)} prompts, but train_prompts + eval_prompts = {need}."
            )
        rng.shuffle(texts)
        return texts[: cfg.train_prompts], texts[len(texts) - cfg.eval_prompts :]

    def fresh_policy(self):
        """The base model with a new LoRA adapter (the reference is the adapter disabled)."""
        torch.manual_seed(self.cfg.seed)
        return load.add_lora(
            load.load_model(self.path), LoraConfig(enabled=True, r=self.cfg.lora_r, alpha=self.cfg.lora_alpha)
        )

    def pairs(
        self, model, *, from_reference: bool, seed: int, beta: Optional[float] = None, desc: str = "sampling pairs"
    ) -> tuple[list[dict], dict]:
        """Sample `samples` responses per training prompt (from the reference or the current policy),
        score them and build pairs; returns (examples, counts)."""
        if not from_reference and hasattr(model, "merge_adapter"):
            model.merge_adapter()
        try:
            samples = sample(
                model,
                self.tokenizer,
                self.train_ids,
                self.cfg.samples,
                max_new_tokens=self.cfg.max_new_tokens,
                seed=seed,
                reference=from_reference,
                progress=self.cfg.progress,
                desc=desc,
            )
        finally:
            if not from_reference and hasattr(model, "merge_adapter"):
                model.unmerge_adapter()
        examples, counts = build_pairs(
            self.train_ids,
            self.train_text,
            samples,
            self.tokenizer,
            self.reward,
            self.cfg.pairs,
            beta or self.cfg.beta,
            seed,
        )
        if len(examples) < 2:
            raise PrefoptError(
                f"reward '{self.cfg.reward}': only {len(examples)} pair(s) from {counts['prompts']} "
                f"prompts ({counts['ties']} tied, {counts['too_few_accepted']} with too few RSO "
                "acceptances); the reward does not tell the samples apart. Use more samples, more "
                "prompts or another reward."
            )
        return examples, counts

    def training_config(self, loss: str, beta: float, out: Path) -> Config:
        """The training config of one training block: LoRA on this experiment's model, `loss` at `beta`."""
        cfg = Config(
            model=ModelConfig(name=self.cfg.model),
            lora=LoraConfig(enabled=True, r=self.cfg.lora_r, alpha=self.cfg.lora_alpha),
            loss=LossConfig(name=loss, beta=beta, **self.cfg.loss_options.get(loss, {})),
            train=TrainConfig(
                output_dir=str(out),
                epochs=self.cfg.epochs,
                batch_size=self.cfg.batch_size,
                lr=self.cfg.lr,
                warmup_ratio=0.1,
                seed=self.cfg.seed,
                logging_steps=1,
                save_steps=0,
                progress=self.cfg.progress,
                gradient_checkpointing=False,
            ),
        )  # short samples: speed first
        complete(cfg, "experiment")
        return cfg

    def train(self, model, examples: list[dict], loss: str, beta: float, out: Path, save: bool = False):
        """Train `model`'s adapter on `examples` (pairs; binarised into desirable / undesirable
        completions for an unpaired loss). Returns the trainer's log; with `save`, the adapter and
        its prefopt.yaml are written to `out` (so prefopt eval / score read the run back)."""
        cfg = self.training_config(loss, beta, out)
        spec = resolve_loss(cfg.loss)
        if not spec.paired:
            examples = binarise(examples)
            if spec.kl_baseline:
                attach_kl_completions(examples, self.cfg.seed)
        examples = [dict(ex) for ex in examples]  # the reference values attached below stay with this run
        collator = make_collator(cfg, self.tokenizer)
        if spec.needs_reference and not spec.moving_reference:  # a moving reference is never precomputed
            reference.precompute(
                model,
                examples,
                collator,
                cache_dir=None,
                batch_size=32,
                chunk=cfg.train.lm_head_chunk,
                autocast_dtype=self.autocast,
                progress=self.cfg.progress,
            )
        trainer = make_trainer(cfg, spec, model, self.tokenizer, collator, examples, [], self.bf16)
        trainer.train()
        if save:
            trainer.save_model(str(out))
            config.save(cfg, Path(out) / "prefopt.yaml")
        return [h for h in trainer.state.log_history if "loss" in h]

    def train_grpo(
        self, model, out: Path, reward: Optional[str] = None, epochs: float = 1.0, **grpo_keys
    ) -> list[dict]:
        """GRPO on this experiment's training prompts: `model`'s adapter trained by the GRPOTrainer
        (`epochs` over the prompts, `batch_size` prompts per step, `samples` completions each,
        `max_new_tokens` at most), rewarded by `reward` (default: the experiment's); `grpo_keys`:
        other keys of the config's grpo section (beta, loss_type, ...). Returns the trainer's log."""
        from prefopt.recipes.grpo import make_grpo_trainer  # a recipe's builder: experiments are jobs too

        cfg = self.training_config("sigmoid", self.cfg.beta, out)
        cfg.train.epochs = epochs
        cfg.grpo = GRPOConfig(
            prompts=self.cfg.prompts,
            reward=reward or self.cfg.reward,
            num_generations=self.cfg.samples,
            max_completion_length=self.cfg.max_new_tokens,
            **grpo_keys,
        )
        complete(cfg, "experiment")
        prompts = [{"prompt": t, "prompt_ids": ids} for t, ids in zip(self.train_text, self.train_ids)]
        reward_fn = rewards.get(cfg.grpo.reward)
        trainer = make_grpo_trainer(cfg, model, self.tokenizer, prompts, reward_fn, self.bf16)
        trainer.train()
        return [h for h in trainer.state.log_history if "loss" in h]

    def evaluate(self, model) -> dict:
        """Reward and KL of the policy against the reference on the held-out prompts (the reference
        samples are drawn once and reused)."""
        res = generation_eval(
            model,
            self.tokenizer,
            self.eval_ids,
            self.eval_text,
            self.reward,
            samples=self.cfg.eval_samples,
            max_new_tokens=self.cfg.max_new_tokens,
            seed=self.cfg.seed + 2,
            autocast_dtype=self.autocast,
            ref_samples=self._ref_eval_samples,
            progress=self.cfg.progress,
        )
        self._ref_eval_samples = res["ref_samples"]
        return res


def build_pairs(prompt_ids, prompt_texts, samples, tokenizer, reward, rule: str, beta: float, seed: int):
    """Pairs from scored samples: best vs worst of each prompt's samples, or (rso) best vs worst of
    the samples accepted by rejection sampling toward π_ref·exp(r/β) (accept y_i with probability
    exp((r_i − max_j r_j)/β)). Prompts whose chosen and rejected scores tie are dropped, counted."""
    rng = random.Random(seed)
    examples, counts = [], {"prompts": len(prompt_ids), "ties": 0, "too_few_accepted": 0}
    for p, text, responses in zip(prompt_ids, prompt_texts, samples):
        decoded = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        scores = reward([text] * len(decoded), decoded)
        idx = list(range(len(scores)))
        if rule == "rso":
            top = max(scores)
            idx = [i for i in idx if rng.random() < math.exp((scores[i] - top) / beta)]
            if len(idx) < 2:
                counts["too_few_accepted"] += 1
                continue
        best = max(idx, key=scores.__getitem__)
        worst = min(idx, key=scores.__getitem__)
        if scores[best] == scores[worst]:
            counts["ties"] += 1
            continue
        examples.append(
            {
                "prompt_ids": p,
                "chosen_ids": responses[best],
                "rejected_ids": responses[worst],
                "chosen_reward": scores[best],
                "rejected_reward": scores[worst],
            }
        )
    counts["pairs"] = len(examples)
    return examples, counts


def binarise(pairs: list[dict]) -> list[dict]:
    """Pairs -> unpaired examples: each chosen a desirable completion, each rejected an undesirable one."""
    out = []
    for ex in pairs:
        out.append({"prompt_ids": ex["prompt_ids"], "completion_ids": ex["chosen_ids"], "label": True})
        out.append({"prompt_ids": ex["prompt_ids"], "completion_ids": ex["rejected_ids"], "label": False})
    return out


def summary_row(**kw) -> dict:
    """`kw` with floats rounded to 4 decimals (a row of a results CSV)."""
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in kw.items()}


EVAL_FIELDS = ("reward_policy", "reward_reference", "reward_gain", "reward_se", "win_rate", "kl_nats")


def result_row(ev: dict, history: list[dict], t0: float, **labels) -> dict:
    """One results row: `labels`, the held-out evaluation `ev` (Experiment.evaluate), the
    training log `history` (steps, first and last loss) and the seconds since `t0`."""
    return summary_row(
        **labels,
        **{k: ev[k] for k in EVAL_FIELDS},
        steps=len(history),
        first_loss=history[0]["loss"],
        last_loss=history[-1]["loss"],
        seconds=elapsed(t0),
    )


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """`rows` as CSV with `columns` (other keys of a row are left out)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def elapsed(t0: float) -> float:
    """Seconds since `t0`, to 0.1 s."""
    return round(time.time() - t0, 1)


def as_dict(cfg: ExperimentConfig) -> dict:
    """The experiment config as a plain dict."""
    return dataclasses.asdict(cfg)
