"""`prefopt demo`: the DPO paper's controlled-sentiment experiment in miniature, fully offline.

1. the reference model (embedded SmolLM2-135M-Instruct) continues movie-review openings,
   K samples per prompt;
2. VADER scores each continuation; the most positive becomes chosen, the least positive
   rejected (prompts whose best and worst score tie are dropped and counted);
3. DPO with LoRA trains on those pairs (reference log-probs computed once, before training);
4. on held-out prompts, reference and policy both sample; the table shows mean reward before and
   after, the policy's win rate against the reference, and KL(π‖π_ref) estimated from the
   policy's samples.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import config as config_mod
from .config import Config, LoraConfig, LossConfig, TrainConfig, resolve_loss, validate
from .modeling import load, reference
from . import rewards
from .experiment import build_pairs
from .gen_eval import generation_eval
from .sampling import sample
from .tasks.sentiment import prompts as review_prompts
from .train import make_collator, make_trainer, seed_everything, use_bf16

log = logging.getLogger("prefopt")


@dataclass
class DemoSettings:
    train_prompts: int = 200
    eval_prompts: int = 40
    samples: int = 8  # per training prompt: the best and the worst make a pair
    eval_samples: int = 4  # per held-out prompt, from reference and from policy
    max_new_tokens: int = 32
    beta: float = 0.1
    lr: float = 5e-4
    batch_size: int = 8
    epochs: float = 1.0
    lora_r: int = 16
    lora_alpha: int = 32

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(train_prompts=16, eval_prompts=4, samples=2, eval_samples=2, max_new_tokens=8, batch_size=4)


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def run_demo(out: str = "runs/demo", seed: int = 0, quick: bool = False, settings: DemoSettings = None) -> dict:
    s = settings or (DemoSettings.quick() if quick else DemoSettings())
    t0 = time.time()
    times = {}
    out_dir = Path(out)
    seed_everything(seed)

    all_prompts = review_prompts()
    order = list(range(len(all_prompts)))
    random.Random(seed).shuffle(order)
    train_text = [all_prompts[i] for i in order[: s.train_prompts]]
    eval_text = [all_prompts[i] for i in order[len(order) - s.eval_prompts:]]

    path = load.resolve("default")
    tokenizer = load.load_tokenizer(path)
    model = load.add_lora(load.load_model(path), LoraConfig(enabled=True, r=s.lora_r, alpha=s.lora_alpha))
    encode = lambda texts: [tokenizer(t, add_special_tokens=False).input_ids for t in texts]  # noqa: E731
    train_ids, eval_ids = encode(train_text), encode(eval_text)
    times["load"] = time.time() - t0

    # 1-2. sample from the reference, score, build best-vs-worst pairs
    t = time.time()
    samples = sample(model, tokenizer, train_ids, s.samples, max_new_tokens=s.max_new_tokens, seed=seed + 1,
                     reference=True, desc="1/4 sampling pairs")
    examples, counts = build_pairs(train_ids, train_text, samples, tokenizer, rewards.vader, "best_vs_worst",
                                   s.beta, seed)
    ties = counts["ties"]
    times["sample+score"] = time.time() - t
    log.info("%d pairs from %d prompts; %d prompts dropped (best and worst scores tie)",
             len(examples), len(train_ids), ties)

    # 3. DPO with LoRA
    t = time.time()
    bf16 = use_bf16("auto")
    autocast = torch.bfloat16 if bf16 else None
    cfg = Config(loss=LossConfig(name="sigmoid", beta=s.beta),
                 train=TrainConfig(output_dir=str(out_dir), epochs=s.epochs, batch_size=s.batch_size, lr=s.lr,
                                   warmup_ratio=0.1, seed=seed, logging_steps=1,
                                   gradient_checkpointing=False))  # short samples, small model: speed first
    validate(cfg, "demo")
    collator = make_collator(cfg, tokenizer)
    reference.precompute(model, examples, collator, cache_dir=None, batch_size=32, chunk=cfg.train.lm_head_chunk,
                         autocast_dtype=autocast, progress=True)
    trainer = make_trainer(cfg, resolve_loss(cfg.loss), model, tokenizer, collator, examples, [], bf16)
    trainer.train()
    trainer.save_model(str(out_dir))
    cfg.model.name, cfg.lora = "default", LoraConfig(enabled=True, r=s.lora_r, alpha=s.lora_alpha)
    config_mod.save(cfg, out_dir / "prefopt.yaml")  # so that prefopt eval / score read the run back
    times["train"] = time.time() - t
    train_log = [h for h in trainer.state.log_history if "loss" in h]

    # 4. evaluate on held-out prompts
    t = time.time()
    ev = generation_eval(model, tokenizer, eval_ids, eval_text, rewards.vader, samples=s.eval_samples,
                         max_new_tokens=s.max_new_tokens, seed=seed + 2, autocast_dtype=autocast)
    ref_samples, pol_samples = ev["ref_samples"], ev["policy_samples"]
    decode = lambda rs: [tokenizer.decode(r, skip_special_tokens=True) for r in rs]  # noqa: E731
    times["eval"] = time.time() - t
    times["total"] = time.time() - t0

    result = {
        "pairs": len(examples), "ties_dropped": ties, "eval_samples": ev["samples"],
        "reward_reference": round(ev["reward_reference"], 3), "reward_policy": round(ev["reward_policy"], 3),
        "reward_gain": round(ev["reward_gain"], 3), "reward_se": round(ev["reward_se"], 3),
        "win_rate": round(ev["win_rate"], 3), "kl_nats": round(ev["kl_nats"], 2),
        "first_loss": round(train_log[0]["loss"], 4), "last_loss": round(train_log[-1]["loss"], 4),
        "steps": trainer.state.global_step, "settings": s.__dict__,
        "seconds": {k: round(v, 1) for k, v in times.items()},
    }
    examples_out = [
        {"prompt": p, "reference": decode(r)[0], "policy": decode(q)[0]}
        for p, r, q in zip(eval_text[:5], ref_samples[:5], pol_samples[:5])
    ]
    with open(out_dir / "demo_pairs.jsonl", "w") as f:
        for ex in examples:
            f.write(json.dumps({"prompt": tokenizer.decode(ex["prompt_ids"]),
                                "chosen": tokenizer.decode(ex["chosen_ids"]),
                                "rejected": tokenizer.decode(ex["rejected_ids"]),
                                "chosen_reward": ex["chosen_reward"],
                                "rejected_reward": ex["rejected_reward"]}) + "\n")
    (out_dir / "demo_results.json").write_text(json.dumps({**result, "samples": examples_out}, indent=2))
    print(table(result))
    return result


def table(r: dict) -> str:
    lines = [
        "",
        "prefopt demo: DPO on controlled sentiment (SmolLM2-135M-Instruct, LoRA, VADER reward)",
        f"  {r['pairs']} training pairs ({r['ties_dropped']} prompts dropped for ties), "
        f"{r['steps']} steps, loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}",
        "",
        f"  {'held-out, ' + str(r['eval_samples']) + ' samples':<30}{'reference':>12}{'DPO policy':>12}",
        f"  {'mean sentiment reward':<30}{r['reward_reference']:>12.3f}{r['reward_policy']:>12.3f}",
        f"  {'gain (± s.e.)':<30}{'':>12}{r['reward_gain']:>+8.3f} ±{r['reward_se']:.2f}",
        f"  {'win rate vs reference':<30}{'':>12}{r['win_rate']:>12.3f}",
        f"  {'KL(policy || reference), nats':<30}{0.0:>12.2f}{r['kl_nats']:>12.2f}",
        "",
        "  time: " + ", ".join(f"{k} {v:.0f}s" for k, v in r["seconds"].items()),
    ]
    return "\n".join(lines)
