"""Sample from the policy and from its reference on the same prompts, score both with a reward
function, and estimate how far the policy moved:

    reward gain   = mean r(x, y_π) − mean r(x, y_ref),   y_π ~ π(·|x), y_ref ~ π_ref(·|x)
    win rate      = P[r(x, y_π) > r(x, y_ref)] over paired draws (ties count ½)
    KL(π‖π_ref)   ≈ mean over y ~ π of Σ_t log π(y_t|x, y_<t) − log π_ref(y_t|x, y_<t)   (nats per sequence)

Sampling is temperature 1 without top-k/top-p, so the KL estimate is unbiased.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Optional

import torch

from prefopt.errors import PrefoptError
from prefopt.evaluation import rewards
from prefopt.evaluation.trained import load_trained
from prefopt.modeling.sampling import response_logps, sample
from prefopt.training.setup import seed_everything


def generation_eval(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    prompt_texts: list[str],
    reward,
    *,
    samples: int,
    max_new_tokens: int,
    seed: int,
    ref_model=None,
    autocast_dtype: Optional[torch.dtype] = None,
    ref_samples=None,
    progress: bool = True,
) -> dict:
    """Reward and KL of the policy `model` against its reference: the adapter-disabled `model`
    (LoRA) or `ref_model` (a frozen copy). `ref_samples` reuses reference samples drawn before
    (they do not depend on the policy). Returns the figures and the samples."""
    if ref_model is None and not hasattr(model, "disable_adapter"):
        raise PrefoptError("generation eval needs a reference: a LoRA policy or a ref_model")
    draw = dict(max_new_tokens=max_new_tokens, seed=seed, progress=progress)
    if ref_samples is None:
        ref_samples = _sample_reference(model, ref_model, tokenizer, prompt_ids, samples, **draw)
    rep = [p for p in prompt_ids for _ in range(samples)]
    pad = tokenizer.pad_token_id
    with _merged_adapter(model):  # sampling from the merged policy is faster
        pol_samples = sample(model, tokenizer, prompt_ids, samples, reference=False, desc="sampling policy", **draw)
        lp_pol = response_logps(model, pad, rep, _flat(pol_samples), autocast_dtype=autocast_dtype)
    lp_ref = _reference_logps(model, ref_model, pad, rep, _flat(pol_samples), autocast_dtype)
    texts = [t for t in prompt_texts for _ in range(samples)]
    ref_rewards = reward(texts, _decode(tokenizer, _flat(ref_samples)))
    pol_rewards = reward(texts, _decode(tokenizer, _flat(pol_samples)))
    return {
        **_figures(ref_rewards, pol_rewards, lp_pol, lp_ref),
        "ref_samples": ref_samples,
        "policy_samples": pol_samples,
        "ref_rewards": ref_rewards,
        "policy_rewards": pol_rewards,
    }


def _sample_reference(model, ref_model, tokenizer, prompt_ids, samples: int, *, max_new_tokens, seed, progress):
    """Samples of the reference: `ref_model`, else `model` with its adapter off."""
    return sample(
        ref_model if ref_model is not None else model,
        tokenizer,
        prompt_ids,
        samples,
        max_new_tokens=max_new_tokens,
        seed=seed,
        reference=ref_model is None,
        progress=progress,
        desc="sampling reference",
    )


@contextlib.contextmanager
def _merged_adapter(model):
    """A peft policy with its adapter merged into the weights for the block, unmerged after."""
    merged = hasattr(model, "merge_adapter")
    if merged:
        model.merge_adapter()
    try:
        yield
    finally:
        if merged:
            model.unmerge_adapter()


def _reference_logps(model, ref_model, pad_token_id: int, prompts, responses, autocast_dtype) -> torch.Tensor:
    """Summed log-probs of `responses` under the reference: `ref_model`, else `model` with its adapter off."""
    if ref_model is not None:
        return response_logps(ref_model, pad_token_id, prompts, responses, autocast_dtype=autocast_dtype)
    return response_logps(model, pad_token_id, prompts, responses, reference=True, autocast_dtype=autocast_dtype)


def _flat(nested: list[list]) -> list:
    """The responses of every prompt, one list."""
    return [r for rs in nested for r in rs]


def _decode(tokenizer, responses: list[list[int]]) -> list[str]:
    """The texts of token-id responses, special tokens dropped."""
    return [tokenizer.decode(r, skip_special_tokens=True) for r in responses]


def _figures(ref_rewards: list, pol_rewards: list, lp_pol: torch.Tensor, lp_ref: torch.Tensor) -> dict:
    """Reward gain (with its standard error), win rate and KL estimate of the module docstring."""
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(pol_rewards, ref_rewards)]
    n = len(ref_rewards)
    return {
        "samples": n,
        "reward_reference": _mean(ref_rewards),
        "reward_policy": _mean(pol_rewards),
        "reward_gain": _mean(pol_rewards) - _mean(ref_rewards),
        "reward_se": ((_sd(ref_rewards) ** 2 + _sd(pol_rewards) ** 2) / max(1, n)) ** 0.5,
        "win_rate": _mean(wins),
        "kl_nats": (lp_pol - lp_ref).mean().item(),
    }


def _mean(xs):
    """Mean of `xs`; NaN when empty."""
    return sum(xs) / len(xs) if xs else float("nan")


def _sd(xs):
    """Sample standard deviation of `xs`."""
    m = _mean(xs)
    return (sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1)) ** 0.5


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
                raise PrefoptError(
                    f"{path}: record {i}: expected a field 'prompt' holding a string or a list of messages."
                )
            records.append(prompt)
    else:
        raise PrefoptError(
            f"{path}: expected a .txt file (one prompt per line) or .jsonl/.json records with a 'prompt' field."
        )
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


def run_generation_eval(
    model_dir: str,
    prompts: str,
    reward: str = "vader",
    samples: int = 4,
    max_new_tokens: int = 32,
    seed: int = 0,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> dict:
    """`prefopt eval --model OUT --prompts PATH --reward NAME`: the figures, without the samples.
    `trust_remote_code` is the caller's decision (see load_trained)."""
    for name, value in (("samples", samples), ("max_new_tokens", max_new_tokens)):
        if value < 1:
            raise PrefoptError(f"{name}: must be at least 1, found {value}.")
    reward_fn = rewards.get(reward)
    trained = load_trained(model_dir, trust_remote_code=trust_remote_code)
    texts, ids = read_prompts(prompts, trained.tokenizer)
    seed_everything(seed)
    res = generation_eval(
        trained.model,
        trained.tokenizer,
        ids,
        texts,
        reward_fn,
        samples=samples,
        max_new_tokens=max_new_tokens,
        seed=seed,
        ref_model=trained.ref_model,
        progress=progress,
    )
    figures = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items() if not isinstance(v, list)}
    return {
        "model": model_dir,
        "prompts": prompts,
        "reward": reward,
        "prompt_count": len(ids),
        "samples_per_prompt": samples,
        **figures,
        "examples": _examples(trained.tokenizer, texts, res),
    }


def _examples(tokenizer, texts: list[str], res: dict) -> list[dict]:
    """The first reference and policy sample of the first three prompts, as text."""
    return [
        {
            "prompt": t,
            "reference": tokenizer.decode(r[0], skip_special_tokens=True),
            "policy": tokenizer.decode(q[0], skip_special_tokens=True),
        }
        for t, r, q in zip(texts[:3], res["ref_samples"], res["policy_samples"])
    ]


def format_table(res: dict) -> str:
    """The result of run_generation_eval as a text table: reference beside policy, then examples."""
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
        lines += [
            f"  prompt:    {ex['prompt'][:100]!r}",
            f"  reference: {ex['reference'][:100]!r}",
            f"  policy:    {ex['policy'][:100]!r}",
            "",
        ]
    return "\n".join(lines)
