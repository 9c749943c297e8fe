"""Sample from the policy and from its reference on the same prompts, score both with a reward
function, and estimate how far the policy moved:

    reward gain   = mean r(x, y_π) − mean r(x, y_ref),   y_π ~ π(·|x), y_ref ~ π_ref(·|x)
    win rate      = P[r(x, y_π) > r(x, y_ref)] over paired draws (ties count ½)
    KL(π‖π_ref)   ≈ mean over y ~ π of Σ_t log π(y_t|x, y_<t) − log π_ref(y_t|x, y_<t)   (nats per sequence)

Sampling is temperature 1 without top-k/top-p, so the KL estimate is unbiased.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from .errors import PrefoptError
from .sampling import response_logps, sample


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def _sd(xs):
    m = _mean(xs)
    return (sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1)) ** 0.5


def generation_eval(model, tokenizer, prompt_ids: list[list[int]], prompt_texts: list[str], reward, *,
                    samples: int, max_new_tokens: int, seed: int, ref_model=None,
                    autocast_dtype: Optional[torch.dtype] = None, ref_samples=None, progress: bool = True) -> dict:
    """Reward and KL of the policy `model` against its reference: the adapter-disabled `model`
    (LoRA) or `ref_model` (a frozen copy). `ref_samples` reuses reference samples drawn before
    (they do not depend on the policy). Returns the figures and the samples."""
    if ref_model is None and not hasattr(model, "disable_adapter"):
        raise PrefoptError("generation eval needs a reference: a LoRA policy or a ref_model")
    if ref_samples is None:
        ref_samples = sample(ref_model if ref_model is not None else model, tokenizer, prompt_ids, samples,
                             max_new_tokens=max_new_tokens, seed=seed, reference=ref_model is None,
                             progress=progress, desc="sampling reference")
    flat = lambda nested: [r for rs in nested for r in rs]  # noqa: E731
    rep = [p for p in prompt_ids for _ in range(samples)]
    merged = hasattr(model, "merge_adapter")
    if merged:
        model.merge_adapter()  # sampling from the merged policy is faster; unmerged again below
    try:
        pol_samples = sample(model, tokenizer, prompt_ids, samples, max_new_tokens=max_new_tokens, seed=seed,
                             reference=False, progress=progress, desc="sampling policy")
        lp_pol = response_logps(model, tokenizer.pad_token_id, rep, flat(pol_samples), autocast_dtype=autocast_dtype)
    finally:
        if merged:
            model.unmerge_adapter()
    if ref_model is not None:
        lp_ref = response_logps(ref_model, tokenizer.pad_token_id, rep, flat(pol_samples),
                                autocast_dtype=autocast_dtype)
    else:
        lp_ref = response_logps(model, tokenizer.pad_token_id, rep, flat(pol_samples), reference=True,
                                autocast_dtype=autocast_dtype)
    decode = lambda rs: [tokenizer.decode(r, skip_special_tokens=True) for r in rs]  # noqa: E731
    texts = [t for t in prompt_texts for _ in range(samples)]
    ref_rewards = reward(texts, decode(flat(ref_samples)))
    pol_rewards = reward(texts, decode(flat(pol_samples)))
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(pol_rewards, ref_rewards)]
    n = len(ref_rewards)
    return {
        "samples": n,
        "reward_reference": _mean(ref_rewards), "reward_policy": _mean(pol_rewards),
        "reward_gain": _mean(pol_rewards) - _mean(ref_rewards),
        "reward_se": ((_sd(ref_rewards) ** 2 + _sd(pol_rewards) ** 2) / max(1, n)) ** 0.5,
        "win_rate": _mean(wins), "kl_nats": (lp_pol - lp_ref).mean().item(),
        "ref_samples": ref_samples, "policy_samples": pol_samples,
        "ref_rewards": ref_rewards, "policy_rewards": pol_rewards,
    }


def read_prompts(path: str, tokenizer) -> tuple[list[str], list[list[int]]]:
    """Prompts of a .txt file (one per line, used as raw text) or a .jsonl/.json file whose records
    have "prompt": a string (raw text) or a list of messages (chat template + generation prompt)."""
    p = Path(path)
    if not p.is_file():
        raise PrefoptError(f"{path}: prompts file not found.")
    records = []
    if p.suffix == ".txt":
        records = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif p.suffix in (".jsonl", ".json"):
        text = p.read_text(encoding="utf-8")
        try:
            rows = json.loads(text) if p.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
        except json.JSONDecodeError as e:
            raise PrefoptError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}).") from None
        for i, row in enumerate(rows, 1):
            prompt = row.get("prompt") if isinstance(row, dict) else None
            if not isinstance(prompt, (str, list)) or not prompt:
                raise PrefoptError(f"{path}: record {i}: expected a field 'prompt' holding a string or a list of "
                                   "messages.")
            records.append(prompt)
    else:
        raise PrefoptError(f"{path}: expected a .txt file (one prompt per line) or .jsonl/.json records with "
                           "a 'prompt' field.")
    if not records:
        raise PrefoptError(f"{path}: no prompts in the file.")
    texts, ids = [], []
    for prompt in records:
        if isinstance(prompt, list):
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        else:
            text = prompt
        texts.append(text)
        ids.append(tokenizer(text, add_special_tokens=False).input_ids)
    return texts, ids


def run_generation_eval(model_dir: str, prompts: str, reward: str = "vader", samples: int = 4,
                        max_new_tokens: int = 32, seed: int = 0, progress: bool = True) -> dict:
    """`prefopt eval --model OUT --prompts PATH --reward NAME`: the figures, without the samples."""
    from . import rewards
    from .modeling.trained import load_trained
    from .train import seed_everything

    reward_fn = rewards.get(reward)
    trained = load_trained(model_dir)
    texts, ids = read_prompts(prompts, trained.tokenizer)
    seed_everything(seed)
    res = generation_eval(trained.model, trained.tokenizer, ids, texts, reward_fn, samples=samples,
                          max_new_tokens=max_new_tokens, seed=seed, ref_model=trained.ref_model, progress=progress)
    examples = [{"prompt": t, "reference": trained.tokenizer.decode(r[0], skip_special_tokens=True),
                 "policy": trained.tokenizer.decode(q[0], skip_special_tokens=True)}
                for t, r, q in zip(texts[:3], res["ref_samples"], res["policy_samples"])]
    figures = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()
               if not isinstance(v, list)}
    return {"model": model_dir, "prompts": prompts, "reward": reward, "prompt_count": len(ids),
            "samples_per_prompt": samples, **figures, "examples": examples}


def format_table(res: dict) -> str:
    lines = [
        f"model   {res['model']}   reward {res['reward']}",
        f"prompts {res['prompts']}: {res['prompt_count']} prompts x {res['samples_per_prompt']} samples",
        "",
        f"  {'':<32}{'reference':>12}{'policy':>12}",
        f"  {'mean reward':<32}{res['reward_reference']:>12.3f}{res['reward_policy']:>12.3f}",
        f"  {'gain (± s.e.)':<32}{'':>12}{res['reward_gain']:>+8.3f} ±{res['reward_se']:.2f}",
        f"  {'win rate vs reference':<32}{'':>12}{res['win_rate']:>12.3f}",
        f"  {'KL(policy || reference), nats':<32}{0.0:>12.2f}{res['kl_nats']:>12.2f}",
        "",
    ]
    for ex in res.get("examples", []):
        lines += [f"  prompt:    {ex['prompt'][:100]!r}", f"  reference: {ex['reference'][:100]!r}",
                  f"  policy:    {ex['policy'][:100]!r}", ""]
    return "\n".join(lines)
