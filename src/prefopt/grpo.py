"""The GRPO objective: group-relative advantages and the clipped, KL-regularised policy loss.

Pure functions on tensors, float-agnostic, no model and no sampling (the trainer that samples the
groups and calls these is prefopt.training.grpo_trainer; docs/grpo.md). Notation:

    P prompts, G completions per prompt (a group), N = P·G completions, T completion positions
    rewards     [P, G]  one scalar reward per completion
    logp        [N, T]  log π_θ(y_t | x, y_<t) of each completion token under the policy
    old_logp    [N, T]  the same under the policy that sampled the group (π_old, detached)
    ref_logp    [N, T]  the same under the frozen reference π_ref (only needed when β > 0)
    advantages  [N]     one advantage per completion (`group_advantages(...).reshape(-1)`)
    mask        [N, T]  1 for completion tokens, 0 for padding; non-negative float weights are
                        allowed and act as token weights in every sum

Names follow TRL's GRPOConfig (`beta`, `epsilon` → `epsilon_low`, `epsilon_high`, `loss_type`,
`scale_rewards`, `importance_sampling_level`, `max_completion_length`) and its logged metrics
(`kl`, `clip_ratio/low_mean`, `clip_ratio/high_mean`, `clip_ratio/region_mean`,
`frac_reward_zero_std`, `reward`, `reward_std`).
"""

from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor

SCALES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
IMPORTANCE_LEVELS = ("token", "sequence")
STD_EPS = 1e-4  # added to the std before dividing, as TRL does


def masked_sum(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    """Σ x·mask over `dim` (all dimensions when None)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    """Σ x·mask / Σ mask over `dim` (all dimensions when None); 0 where the mask is empty."""
    mask = mask.to(x.dtype)
    den = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / torch.clamp(den, min=torch.finfo(x.dtype).tiny)


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token KL estimate k3 (Schulman 2020, "Approximating KL divergence"), as in GRPO:

        k3 = exp(ref_logp − logp) − (ref_logp − logp) − 1  ≥ 0

    Under y ~ π its expectation is exactly KL(π‖π_ref): E_π[π_ref/π] = 1, E_π[−log(π_ref/π)] =
    KL(π‖π_ref). Differentiated through logp with the samples held fixed (as a loss term is), its
    expected gradient is ∇KL(π_ref‖π), the *forward* KL: E_π[(1 − π_ref/π)∇log π] =
    −Σ_y π_ref(y)∇log π(y). Computed as expm1(d) − d for accuracy near 0.
    """
    d = ref_logp - logp
    return torch.expm1(d) - d


def group_advantages(rewards: Tensor, scale: str = "group", eps: float = STD_EPS) -> tuple[Tensor, dict]:
    """Group-relative advantages of rewards [P, G] (one row per prompt) and their statistics.

        A_ij = (r_ij − mean_j r_ij) / (s + eps)

    s = the group's std s_i (scale="group"; GRPO, Shao et al. 2024, "DeepSeekMath"), the std of
    all P·G rewards (scale="batch"; the mean is still the group's), or no division at all
    (scale="none"; Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training"). Stds are
    unbiased (divisor n − 1, torch's default, as TRL); a group of one has s = 0 and A = 0.

    Returns (A [P, G], stats) with stats (0-dim tensors, detached): `reward` (mean reward),
    `reward_std` (mean over groups of s_i, or the batch std for scale="batch", as TRL logs it) and
    `frac_reward_zero_std` (the fraction of groups whose rewards are all equal: their advantages
    are 0 and they give no gradient). TRL computes the last from the batch std when
    scale="batch"; here it is always per group.
    """
    if scale not in SCALES:
        raise ValueError(f"unknown scale '{scale}'; known: {', '.join(SCALES)}")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [prompts, group size], got shape {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    group_std = _std(rewards, dim=1)
    std = group_std[:, None] if scale == "group" else _std(rewards.reshape(-1), dim=0)
    adv = centred if scale == "none" else centred / (std + eps)
    zero = torch.isclose(group_std, torch.zeros_like(group_std))
    stats = {
        "reward": rewards.mean().detach(),
        "reward_std": (std.mean() if scale == "batch" else group_std.mean()).detach(),
        "frac_reward_zero_std": zero.to(rewards.dtype).mean(),
    }
    return adv, stats


def _std(x: Tensor, dim: int) -> Tensor:
    """Unbiased std along `dim`; 0 (not NaN) when there is a single value."""
    if x.shape[dim] < 2:
        return torch.zeros_like(x.select(dim, 0) if x.dim() > 1 else x.sum())
    return x.std(dim=dim)


def log_importance_weights(logp: Tensor, old_logp: Tensor, mask: Tensor, level: str = "token") -> Tensor:
    """log ρ, the log importance ratio of the policy to the one that sampled.

        token     log ρ_t = logp_t − old_logp_t                               [N, T]
        sequence  log ρ   = Σ_t mask_t (logp_t − old_logp_t) / Σ_t mask_t      [N, 1]

    The sequence level is GSPO's (Zheng et al. 2025, "Group Sequence Policy Optimization"):
    the length-normalised sequence ratio ρ = (π_θ(y|x)/π_old(y|x))^(1/|y|), one per completion,
    broadcast to its tokens; its gradient flows through every token of the mean.
    """
    d = logp - old_logp
    if level == "token":
        return d
    if level == "sequence":
        return masked_mean(d, mask, dim=-1)[:, None]
    raise ValueError(f"unknown importance_sampling_level '{level}'; known: {', '.join(IMPORTANCE_LEVELS)}")


def clipped_surrogate(log_w: Tensor, advantages: Tensor, epsilon_low: float, epsilon_high: float):
    """PPO's clipped surrogate per token, negated to a loss (Schulman et al. 2017):

        ℓ = −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A),   ρ = exp(log_w)

    ε_high > ε_low is DAPO's "clip-higher" (Yu et al. 2025). Returns (ℓ, low, high): ℓ with
    log_w's shape, and bool tensors of the tokens whose gradient the clip removes: low where
    ρ < 1 − ε_low and A < 0, high where ρ > 1 + ε_high and A > 0 (TRL's clip-ratio definitions).
    """
    a = advantages[:, None]
    rho = torch.exp(log_w)
    clipped = torch.clamp(rho, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.minimum(rho * a, clipped * a)
    low = (rho < 1 - epsilon_low) & (a < 0)
    high = (rho > 1 + epsilon_high) & (a > 0)
    return loss, low, high


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    loss_type: str,
    max_completion_length: Optional[int] = None,
    num_items_in_batch: Optional[float] = None,
) -> Tensor:
    """Reduce per-token losses [N, T] to the scalar loss, as TRL's `loss_type` names it:

        grpo     (1/N) Σ_i [Σ_t m_it ℓ_it / Σ_t m_it]     mean per sequence, then over sequences
        bnpo     Σ_it m_it ℓ_it / Σ_it m_it               token mean of this (micro-)batch
        dapo     Σ_it m_it ℓ_it / num_items_in_batch      token mean of the global batch
        dr_grpo  Σ_it m_it ℓ_it / (N · max_completion_length)

    grpo weights every sequence equally (so each token of a long completion counts less: the
    length bias Dr. GRPO removes); bnpo and dapo weight every token equally. They differ only in
    the denominator: bnpo divides by this call's token count, so under gradient accumulation or
    DDP the trainer averages per-micro-batch token means (a mean of means); dapo divides by the
    token count of the whole global batch (DAPO, Yu et al. 2025) — pass `num_items_in_batch` =
    total completion tokens over all accumulation micro-batches and all processes, divided by the
    number of processes when DDP averages gradients (TRL's `num_items_in_batch / num_processes`),
    and sum the micro-batch losses without dividing by the accumulation steps. Left None, dapo
    uses this call's count (= bnpo). dr_grpo's denominator is a constant (Liu et al. 2025); a
    None `max_completion_length` takes T.
    """
    if loss_type == "grpo":
        return masked_mean(per_token, mask, dim=-1).mean()
    if loss_type == "bnpo" or (loss_type == "dapo" and num_items_in_batch is None):
        return masked_mean(per_token, mask)
    if loss_type == "dapo":
        return masked_sum(per_token, mask) / num_items_in_batch
    if loss_type == "dr_grpo":
        length = per_token.shape[-1] if max_completion_length is None else max_completion_length
        return masked_sum(per_token, mask) / (per_token.shape[0] * length)
    raise ValueError(f"unknown loss_type '{loss_type}'; known: {', '.join(LOSS_TYPES)}")


def policy_loss(
    logp: Tensor,
    old_logp: Optional[Tensor],
    ref_logp: Optional[Tensor],
    advantages: Tensor,
    mask: Tensor,
    *,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: Optional[float] = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    max_completion_length: Optional[int] = None,
    num_items_in_batch: Optional[float] = None,
) -> tuple[Tensor, dict]:
    """The GRPO loss (Shao et al. 2024) and its variants; returns (scalar loss, metrics).

        ℓ_it = −min(ρ_it·A_i, clip(ρ_it, 1 − ε_low, 1 + ε_high)·A_i) + β·k3_it
        ρ_it = exp(logp_it − old_logp_it)                         (token level)
             = exp(Σ_t m_it (logp_it − old_logp_it) / Σ_t m_it)   (sequence level, GSPO)
        k3_it = exp(ref_logp_it − logp_it) − (ref_logp_it − logp_it) − 1
        L = aggregate(ℓ, m, loss_type)                            (see `aggregate`)

    old_logp None means on-policy (old = logp detached: ρ = 1, and the gradient of the surrogate
    is −A_i·∇logp_it, the policy gradient with the group baseline). ε_high None means ε_low
    (symmetric PPO clip); ε_high > ε_low is DAPO's clip-higher. β = 0 needs no reference
    (ref_logp may be None). Defaults are TRL's GRPOConfig ones (β 0, ε 0.2); loss_type "dapo"
    is token-level.

    Metrics (0-dim, detached), TRL's names: `kl` (token mean of k3; only when ref_logp is given),
    `clip_ratio/low_mean`, `clip_ratio/high_mean`, `clip_ratio/region_mean` (token fractions
    where the clip is active, per `clipped_surrogate`; per sequence at the sequence level),
    `completions/mean_length` (mean of Σ_t m_it).
    """
    mask = mask.to(logp.dtype)
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    old = logp.detach() if old_logp is None else old_logp
    log_w = log_importance_weights(logp, old, mask, importance_sampling_level)
    surrogate, low, high = clipped_surrogate(log_w, advantages, epsilon_low, eps_high)
    per_token = surrogate.expand_as(logp)
    metrics = {}
    if ref_logp is not None:
        kl = kl_k3(logp, ref_logp)
        metrics["kl"] = masked_mean(kl, mask).detach()
        if beta:
            per_token = per_token + beta * kl
    elif beta:
        raise ValueError("beta > 0 needs ref_logp (reference log-probs); it was not given")
    loss = aggregate(per_token, mask, loss_type, max_completion_length, num_items_in_batch)
    metrics.update(_clip_metrics(low, high, mask))
    metrics["completions/mean_length"] = mask.sum(-1).mean().detach()
    return loss, metrics


def _clip_metrics(low: Tensor, high: Tensor, mask: Tensor) -> dict:
    """Fractions of tokens (of sequences, when the flags are per sequence) clipped low, high, either."""

    def frac(flags: Tensor) -> Tensor:
        f = flags.to(mask.dtype)
        return f.mean() if f.shape[-1] == 1 else masked_mean(f, mask)

    return {
        "clip_ratio/low_mean": frac(low),
        "clip_ratio/high_mean": frac(high),
        "clip_ratio/region_mean": frac(low | high),
    }
