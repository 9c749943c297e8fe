"""The preference-loss family: small pure functions on per-sequence log-probabilities.

Notation (all tensors have one entry per pair, shape [B]):
    logp_c, logp_r          summed log π_θ(y|x) of the chosen / rejected response
    ref_logp_c, ref_logp_r  the same under the frozen reference π_ref
    len_c, len_r            token counts of the chosen / rejected response (float tensors)
    Δ_c = logp_c − ref_logp_c,  Δ_r = logp_r − ref_logp_r,  h = Δ_c − Δ_r
    σ = logistic sigmoid,  NLL = −logp_c / len_c  (per-token negative log-likelihood of chosen)

Paired losses share one signature:

    fn(logp_c, logp_r, ref_logp_c=None, ref_logp_r=None, *, len_c=None, len_r=None, **hyper) -> Tensor[B]

reference-free ones ignore the ref arguments. Unpaired losses (good/bad labels, no pairs) use

    fn(logp, ref_logp, label, *, kl_logp=None, kl_ref_logp=None, len=None, **hyper, state=None) -> Tensor[B]

with `label` a bool tensor (True = desirable). Each function returns the per-example loss; the
caller takes the mean. Use them in your own loop:

    from prefopt import losses
    spec = losses.get("ipo")
    loss = spec.fn(logp_c, logp_r, ref_logp_c, ref_logp_r, len_c=len_c, len_r=len_r,
                   **spec.hyperparameters).mean()

The registry (`REGISTRY`, `get`, `names`) holds one `LossSpec` per loss with every trait the
rest of prefopt reads: whether it needs a reference model, pairs or unpaired labels, a state kept
by the caller (`state_class`), KTO's mismatched completions, whether its per-example losses belong
to pairs, the tokens its sums cover (`token_subset`, SamPO), a reference that moves during training
(`moving_reference`, TR-DPO), its hyperparameters and the form of its implicit reward
(`implicit_rewards`). So the trainer loads a reference only when needed and refuses data of the
wrong shape. docs/losses.md has the formulas, the hyperparameter ranges and a rule of thumb for
choosing; docs/contributing.md shows how to add a loss.
"""

from __future__ import annotations

import copy
import inspect
import math
import random
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------


def _need(x: Optional[Tensor], what: str, loss: str) -> Tensor:
    if x is None:
        raise ValueError(f"loss '{loss}' needs {what}; it was not given")
    return x


def _ratios(logp_c, logp_r, ref_logp_c, ref_logp_r, loss: str):
    """(Δ_c, Δ_r) = (logp_c − ref_logp_c, logp_r − ref_logp_r)."""
    _need(ref_logp_c, "ref_logp_c (reference log-probs)", loss)
    _need(ref_logp_r, "ref_logp_r (reference log-probs)", loss)
    return logp_c - ref_logp_c, logp_r - ref_logp_r


def _smoothed(x: Tensor, eps: float) -> Tensor:
    """−(1−ε)·log σ(x) − ε·log σ(−x): the logistic loss against a label that is right w.p. 1−ε."""
    out = -F.logsigmoid(x)
    if eps:
        out = (1 - eps) * out - eps * F.logsigmoid(-x)
    return out


def nll(logp_c: Tensor, len_c: Optional[Tensor], loss: str = "nll") -> Tensor:
    """Per-token negative log-likelihood of the chosen response: NLL = −logp_c / len_c."""
    return -logp_c / _need(len_c, "len_c (token counts of the chosen response)", loss)


def log1mexp(m: Tensor) -> Tensor:
    """log(1 − exp(m)) for m < 0, accurate everywhere (Mächler 2012): log(−expm1(m)) near 0,
    log1p(−exp(m)) below −log 2."""
    cut = -math.log(2.0)
    near = torch.log(-torch.expm1(torch.clamp(m, min=cut)))
    far = torch.log1p(-torch.exp(torch.clamp(m, max=cut)))
    return torch.where(m > cut, near, far)


def _capped_exp(x: Tensor) -> Tensor:
    """exp(x) with x capped just below overflow of x's dtype (so an extreme ratio gives a large
    finite value, not inf)."""
    return torch.exp(torch.clamp(x, max=math.log(torch.finfo(x.dtype).max) - 1.0))


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")


def f_log_ratio(logp: Tensor, ref_logp: Tensor, divergence: str = "reverse_kl", alpha: float = 1.0) -> Tensor:
    """f′(π/π_ref) written in the log-ratio u = logp − ref_logp (Wang et al. 2023, "Beyond Reverse
    KL: Generalizing DPO with Diverse Divergence Constraints"). Additive constants are dropped,
    they cancel between chosen and rejected:

        reverse_kl  f(x) = x log x        f′ → u
        forward_kl  f(x) = −log x         f′ → −exp(−u)
        js          f(x) = x log x − (x+1) log((x+1)/2)
                                          f′ → log 2 + u − log(1 + exp(u)) = log 2 + log σ(u)
        alpha       f(x) = (x^(1−α) − (1−α)x − α) / (α(α−1))
                                          f′ → (1 − exp(−α·u)) / α      (α ≠ 0; α → 0 is reverse KL)

    `alpha` is the paper's α (TRL's `f_alpha_divergence_coef` is 1 − α; the two agree at 0.5).
    The policy that minimises the f-DPO loss under Bradley–Terry labels satisfies
    β·f′(π*(y)/π_ref(y)) = r(y) + const.
    """
    u = logp - ref_logp
    if divergence == "reverse_kl":
        return u
    if divergence == "forward_kl":
        return -_capped_exp(-u)
    if divergence == "js":
        return math.log(2.0) + F.logsigmoid(u)  # = log 2 + u − log(1 + e^u), exact for large |u|
    if divergence == "alpha":
        if alpha == 0:
            raise ValueError("f_alpha must be non-zero (alpha → 0 is reverse_kl)")
        return (1 - _capped_exp(-alpha * u)) / alpha
    raise ValueError(f"unknown f_divergence '{divergence}'; known: {', '.join(F_DIVERGENCES)}")


class LossState:
    """What a stateful loss keeps across steps: one object per training run, kept by the caller and
    handed to the loss as `state=` (`LossSpec.state_class` says which class).

    `update(x)` folds one batch's detached values in; `to_dict()` / `load_dict(d)` save and
    restore it (JSON-able, for checkpoints); `copy()` is an independent copy (e.g. for evaluation,
    which should not advance the running state). `gather`, when set, is applied to x first by
    `update`: under data parallelism set it to a function that gathers x from every process
    (accelerate's `gather`), so that every process keeps the same state.
    """

    gather: Optional[Callable[[Tensor], Tensor]] = None

    def _batch(self, x: Tensor) -> Tensor:
        """x detached, gathered (when `gather` is set), flattened, in float64."""
        x = x.detach()
        if self.gather is not None:
            x = self.gather(x.contiguous())
        return x.reshape(-1).double()

    def update(self, x: Tensor):
        raise NotImplementedError

    def to_dict(self) -> dict:
        raise NotImplementedError

    def load_dict(self, d: dict) -> None:
        raise NotImplementedError

    def copy(self) -> "LossState":
        """An independent copy (the same values and `gather`)."""
        return copy.copy(self)


class BCOState(LossState):
    """Running mean δ of the implicit rewards β·Δ seen so far (BCO's reward shift).

    `update(rewards)` folds a batch in (count-weighted, detached) and returns the new mean. One
    state per training run; under data parallelism set `gather` (see `LossState`).
    """

    def __init__(self, mean: float = 0.0, count: int = 0):
        self.mean = float(mean)
        self.count = int(count)

    def update(self, rewards: Tensor) -> float:
        """Fold the (detached) `rewards` of one batch into the running mean, weighted by their
        count, and return the new mean δ. An empty tensor leaves the state as it was."""
        r = self._batch(rewards)
        n = r.numel()
        if n:
            total = self.count + n
            self.mean += (r.mean().item() - self.mean) * n / total
            self.count = total
        return self.mean

    def to_dict(self) -> dict:
        return {"mean": self.mean, "count": self.count}

    def load_dict(self, d: dict) -> None:
        self.mean, self.count = float(d["mean"]), int(d["count"])

    def __repr__(self) -> str:
        return f"BCOState(mean={self.mean:.6g}, count={self.count})"


class BetaDPOState(LossState):
    """β-DPO's running statistics of the pairs' margins M_i = h_i (Wu et al. 2024; see `beta_dpo`):
    the threshold M0 (`mean`) and the spread σ (`std`), exponential moving averages over batches
    with momentum m (the paper's m = 0.9):

        M0 ← m·M0 + (1−m)·mean_batch(M),   σ ← m·σ + (1−m)·std_batch(M)

    The first batch sets them (the authors' code starts both at 0 instead); σ is left out by a batch
    of one pair (std undefined) and stays None until a batch of two or more has been seen.
    `update(margins)` folds a batch in (detached; gathered when `gather` is set) and returns M0.
    """

    def __init__(self, mean: float = 0.0, std: Optional[float] = None, count: int = 0, momentum: float = 0.9):
        if not 0 <= momentum < 1:
            raise ValueError(f"BetaDPOState: momentum must be in [0, 1), found {momentum}")
        self.mean = float(mean)
        self.std = None if std is None else float(std)
        self.count = int(count)  # batches folded in
        self.momentum = float(momentum)

    def update(self, margins: Tensor) -> float:
        """Fold one batch of margins in and return the new threshold M0. An empty tensor leaves
        the state as it was."""
        x = self._batch(margins)
        n = x.numel()
        if not n:
            return self.mean
        m = self.momentum
        batch_mean = x.mean().item()
        self.mean = batch_mean if self.count == 0 else m * self.mean + (1 - m) * batch_mean
        if n >= 2:
            batch_std = x.std().item()
            self.std = batch_std if self.std is None else m * self.std + (1 - m) * batch_std
        self.count += 1
        return self.mean

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "count": self.count, "momentum": self.momentum}

    def load_dict(self, d: dict) -> None:
        self.mean = float(d["mean"])
        self.std = None if d.get("std") is None else float(d["std"])
        self.count = int(d["count"])
        self.momentum = float(d.get("momentum", self.momentum))

    def __repr__(self) -> str:
        std = "None" if self.std is None else f"{self.std:.6g}"
        return f"BetaDPOState(mean={self.mean:.6g}, std={std}, count={self.count}, momentum={self.momentum:g})"


def _reward_shift(rewards: Tensor, state: Optional[BCOState]) -> Union[Tensor, float]:
    """δ: the batch mean of the (detached) rewards, or the running mean kept in `state`."""
    if state is None:
        return rewards.detach().mean()
    return state.update(rewards)


# --------------------------------------------------------------------------------------------
# paired losses that need a reference
# --------------------------------------------------------------------------------------------


def sigmoid(
    logp_c: Tensor,
    logp_r: Tensor,
    ref_logp_c: Optional[Tensor] = None,
    ref_logp_r: Optional[Tensor] = None,
    *,
    len_c: Optional[Tensor] = None,
    len_r: Optional[Tensor] = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 1.0,
) -> Tensor:
    """DPO (Rafailov et al. 2023), with cDPO label smoothing ε (Mitchell 2023):

        L = −(1−ε)·log σ(β·h) − ε·log σ(−β·h),   h = (logp_c − ref_logp_c) − (logp_r − ref_logp_r)

    ε = 0 is plain DPO. With f_divergence ≠ "reverse_kl" (f-DPO, Wang et al. 2023) the log-ratios
    are replaced by f′(π/π_ref): h = f_log_ratio(logp_c, ref_logp_c) − f_log_ratio(logp_r, ref_logp_r).
    """
    _ratios(logp_c, logp_r, ref_logp_c, ref_logp_r, "sigmoid")
    h = f_log_ratio(logp_c, ref_logp_c, f_divergence, f_alpha) - f_log_ratio(logp_r, ref_logp_r, f_divergence, f_alpha)
    return _smoothed(beta * h, label_smoothing)


def robust(
    logp_c,
    logp_r,
    ref_logp_c=None,
    ref_logp_r=None,
    *,
    len_c=None,
    len_r=None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Tensor:
    """rDPO (Chowdhury et al. 2024, "Provably Robust DPO"), for labels flipped at a known rate ε:

        L = [(1−ε)·(−log σ(β·h)) − ε·(−log σ(−β·h))] / (1 − 2ε)

    Its expectation over the label noise equals the clean DPO loss (unbiased), so it keeps DPO's
    optimum. ε ∈ [0, 0.5); ε = 0 is DPO. A single pair's loss is not bounded below.
    """
    eps = label_smoothing
    if not 0 <= eps < 0.5:
        raise ValueError(f"robust: label_smoothing (flip rate ε) must be in [0, 0.5), found {eps}")
    d_c, d_r = _ratios(logp_c, logp_r, ref_logp_c, ref_logp_r, "robust")
    x = beta * (d_c - d_r)
    return ((1 - eps) * -F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)


def ipo(
    logp_c,
    logp_r,
    ref_logp_c=None,
    ref_logp_r=None,
    *,
    len_c=None,
    len_r=None,
    beta: float = 0.1,
    ipo_normalize: bool = True,
) -> Tensor:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", eq. 17, τ = β):

        L = (h′ − 1/(2β))²,   h′ = Δ_c/len_c − Δ_r/len_r   (ipo_normalize, the default)
                              h′ = h                       (ipo_normalize=False: summed log-ratios)
    """
    d_c, d_r = _ratios(logp_c, logp_r, ref_logp_c, ref_logp_r, "ipo")
    if ipo_normalize:
        d_c = d_c / _need(len_c, "len_c (ipo_normalize=True)", "ipo")
        d_r = d_r / _need(len_r, "len_r (ipo_normalize=True)", "ipo")
    return (d_c - d_r - 1 / (2 * beta)) ** 2


def hinge(logp_c, logp_r, ref_logp_c=None, ref_logp_r=None, *, len_c=None, len_r=None, beta: float = 0.1) -> Tensor:
    """SLiC-HF calibration hinge (Zhao et al. 2023), reference-normalised as in RSO (Liu et al. 2023):

    L = max(0, 1 − β·h)
    """
    d_c, d_r = _ratios(logp_c, logp_r, ref_logp_c, ref_logp_r, "hinge")
    return torch.relu(1 - beta * (d_c - d_r))


def exo_pair(
    logp_c,
    logp_r,
    ref_logp_c=None,
    ref_logp_r=None,
    *,
    len_c=None,
    len_r=None,
    beta: float = 0.1,
    label_smoothing: float = 1e-3,
) -> Tensor:
    """EXO (Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment",
    eq. 16 with K = 2): the reverse KL from the model's pair distribution p = (σ(βh), σ(−βh)) to the
    smoothed label distribution q = (1−ε, ε):

        L = σ(βh)·(log σ(βh) − log(1−ε)) + σ(−βh)·(log σ(−βh) − log ε)

    ε must be in (0, 1); ε = 0 is read as 1e-3, the paper's value (TRL 1.16 refuses ε = 0).
    """
    eps = label_smoothing or 1e-3
    if not 0 < eps < 1:
        raise ValueError(f"exo_pair: label_smoothing must be in (0, 1), found {eps}")
    d_c, d_r = _ratios(logp_c, logp_r, ref_logp_c, ref_logp_r, "exo_pair")
    x = beta * (d_c - d_r)
    return torch.sigmoid(x) * (F.logsigmoid(x) - math.log(1 - eps)) + torch.sigmoid(-x) * (
        F.logsigmoid(-x) - math.log(eps)
    )


def nca_pair(logp_c, logp_r, ref_logp_c=None, ref_logp_r=None, *, len_c=None, len_r=None, beta: float = 0.1) -> Tensor:
    """NCA (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit
    Rewards"), pairwise form with rewards r = β·Δ:

        L = −log σ(β·Δ_c) − ½·log σ(−β·Δ_c) − ½·log σ(−β·Δ_r)

    Unlike DPO it optimises the absolute likelihood of chosen, not only the margin.
    """
    d_c, d_r = _ratios(logp_c, logp_r, ref_logp_c, ref_logp_r, "nca_pair")
    return -F.logsigmoid(beta * d_c) - 0.5 * F.logsigmoid(-beta * d_c) - 0.5 * F.logsigmoid(-beta * d_r)


def bco_pair(
    logp_c,
    logp_r,
    ref_logp_c=None,
    ref_logp_r=None,
    *,
    len_c=None,
    len_r=None,
    beta: float = 0.1,
    state: Optional[BCOState] = None,
) -> Tensor:
    """BCO on pairs (Jung et al. 2024, "Binary Classifier Optimization for LLM Alignment"): chosen
    and rejected are classified as good / bad with the implicit reward shifted by δ:

        L = −log σ(β·Δ_c − δ) − log σ(−(β·Δ_r − δ))

    δ = mean of the rewards {β·Δ_c, β·Δ_r}, detached: of this batch (state=None) or the running
    mean kept in `state` (a BCOState, updated with this batch first).
    """
    d_c, d_r = _ratios(logp_c, logp_r, ref_logp_c, ref_logp_r, "bco_pair")
    r_c, r_r = beta * d_c, beta * d_r
    delta = _reward_shift(torch.cat([r_c, r_r]), state)
    return -F.logsigmoid(r_c - delta) - F.logsigmoid(-(r_r - delta))


def sppo_hard(logp_c, logp_r, ref_logp_c=None, ref_logp_r=None, *, len_c=None, len_r=None, beta: float = 0.1) -> Tensor:
    """SPPO with hard win probabilities (Wu et al. 2024, "Self-Play Preference Optimization",
    eq. 4.7 with P(y_w ≻ π) = 1, P(y_l ≻ π) = 0, η = 1/β):

        L = (Δ_c − 1/(2β))² + (Δ_r + 1/(2β))²
    """
    d_c, d_r = _ratios(logp_c, logp_r, ref_logp_c, ref_logp_r, "sppo_hard")
    return (d_c - 0.5 / beta) ** 2 + (d_r + 0.5 / beta) ** 2


def aot(
    logp_c,
    logp_r,
    ref_logp_c=None,
    ref_logp_r=None,
    *,
    len_c=None,
    len_r=None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Tensor:
    """AOT, paired (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal
    Transport"): first-order stochastic dominance of the policy's log-odds over the reference's,
    enforced on the sorted batch (the 1-D optimal-transport coupling):

        a = sort_batch(logp_c − logp_r),  b = sort_batch(ref_logp_c − ref_logp_r)
        L_i = −(1−ε)·log σ(β(a_i − b_i)) − ε·log σ(−β(a_i − b_i))

    L_i belongs to the i-th order statistic, not to pair i: only the batch mean is meaningful.
    """
    _ratios(logp_c, logp_r, ref_logp_c, ref_logp_r, "aot")
    a, _ = torch.sort(logp_c - logp_r, dim=0)
    b, _ = torch.sort(ref_logp_c - ref_logp_r, dim=0)
    return _smoothed(beta * (a - b), label_smoothing)


def aot_pair(
    logp_c,
    logp_r,
    ref_logp_c=None,
    ref_logp_r=None,
    *,
    len_c=None,
    len_r=None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Tensor:
    """AOT, unpaired form (Melnyk et al. 2024): the distribution of chosen log-ratios must dominate
    that of rejected log-ratios; chosen and rejected are sorted independently:

        a = sort_batch(Δ_c),  b = sort_batch(Δ_r)
        L_i = −(1−ε)·log σ(β(a_i − b_i)) − ε·log σ(−β(a_i − b_i))

    L_i belongs to the i-th order statistic, not to pair i: only the batch mean is meaningful.
    """
    d_c, d_r = _ratios(logp_c, logp_r, ref_logp_c, ref_logp_r, "aot_pair")
    a, _ = torch.sort(d_c, dim=0)
    b, _ = torch.sort(d_r, dim=0)
    return _smoothed(beta * (a - b), label_smoothing)


def apo_zero(logp_c, logp_r, ref_logp_c=None, ref_logp_r=None, *, len_c=None, len_r=None, beta: float = 0.1) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive
    Revisions", eq. 7): raise chosen, lower rejected, each anchored to the reference:

        L = (1 − σ(β·Δ_c)) + σ(β·Δ_r)

    For when the chosen outputs are better than the model's own.
    """
    d_c, d_r = _ratios(logp_c, logp_r, ref_logp_c, ref_logp_r, "apo_zero")
    return (1 - torch.sigmoid(beta * d_c)) + torch.sigmoid(beta * d_r)


def apo_down(logp_c, logp_r, ref_logp_c=None, ref_logp_r=None, *, len_c=None, len_r=None, beta: float = 0.1) -> Tensor:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8): lower chosen, and lower rejected more:

        L = σ(β·Δ_c) + (1 − σ(β·(Δ_c − Δ_r)))

    For when the chosen outputs are worse than the model's own.
    """
    d_c, d_r = _ratios(logp_c, logp_r, ref_logp_c, ref_logp_r, "apo_down")
    return torch.sigmoid(beta * d_c) + (1 - torch.sigmoid(beta * (d_c - d_r)))


def discopop(
    logp_c,
    logp_r,
    ref_logp_c=None,
    ref_logp_r=None,
    *,
    len_c=None,
    len_r=None,
    beta: float = 0.1,
    discopop_tau: float = 0.05,
) -> Tensor:
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, "Discovering Preference
    Optimization Algorithms with and for Large Language Models", eq. 5), x = β·h:

        m = σ(x/τ),   L = (1 − m)·(−log σ(x)) + m·exp(−x)

    a logistic (DPO) loss for negative margins blended into an exponential loss for positive
    ones. m·exp(−x) is computed as exp(log σ(x/τ) − x), finite for any x.
    """
    d_c, d_r = _ratios(logp_c, logp_r, ref_logp_c, ref_logp_r, "discopop")
    x = beta * (d_c - d_r)
    return torch.sigmoid(-x / discopop_tau) * -F.logsigmoid(x) + torch.exp(F.logsigmoid(x / discopop_tau) - x)


def sigmoid_norm(
    logp_c, logp_r, ref_logp_c=None, ref_logp_r=None, *, len_c=None, len_r=None, beta: float = 5.0
) -> Tensor:
    """Length-normalised DPO (the per-token form used e.g. by Tülu 3, Lambert et al. 2024):

        L = −log σ(β·(Δ_c/len_c − Δ_r/len_r))

    β acts on per-token log-ratios, so it is much larger than DPO's (Tülu 3 uses β = 5).
    """
    d_c, d_r = _ratios(logp_c, logp_r, ref_logp_c, ref_logp_r, "sigmoid_norm")
    n_c = _need(len_c, "len_c (token counts)", "sigmoid_norm")
    n_r = _need(len_r, "len_r (token counts)", "sigmoid_norm")
    return -F.logsigmoid(beta * (d_c / n_c - d_r / n_r))


def dpop(
    logp_c,
    logp_r,
    ref_logp_c=None,
    ref_logp_r=None,
    *,
    len_c=None,
    len_r=None,
    beta: float = 0.1,
    dpop_lambda: float = 50.0,
) -> Tensor:
    """DPO-Positive (Pal et al. 2024, "Smaug: Fixing Failure Modes of Preference Optimisation with
    DPO-Positive", §4 eq. 3): DPO with a penalty once the chosen response becomes less likely than
    under the reference,

        L = −log σ(β·(h − λ·max(0, ref_logp_c − logp_c))),   λ = dpop_lambda

    λ = 0 is DPO. The paper's experiments use λ = 50 (5 and 500 gave similar results) with β = 0.3.
    """
    d_c, d_r = _ratios(logp_c, logp_r, ref_logp_c, ref_logp_r, "dpop")
    return -F.logsigmoid(beta * (d_c - d_r - dpop_lambda * torch.relu(-d_c)))


def cal_dpo(logp_c, logp_r, ref_logp_c=None, ref_logp_r=None, *, len_c=None, len_r=None, beta: float = 0.1) -> Tensor:
    """Cal-DPO (Xiao et al. 2024, "Cal-DPO: Calibrated Direct Preference Optimization for Language
    Model Alignment", NeurIPS; its Cal-DPO objective): a Bradley–Terry term on the log-ratios
    plus a calibration that pulls the chosen log-ratio to 1/(2β) and the rejected one to −1/(2β),

        L = −log σ(Δ_c − Δ_r) + (Δ_c − 1/(2β))² + (Δ_r + 1/(2β))²

    β does not multiply the margin inside σ (as in the authors' code, their `shift` = ½): it only
    sets the calibration targets ±1/(2β), i.e. implicit rewards β·Δ → ±½.
    """
    d_c, d_r = _ratios(logp_c, logp_r, ref_logp_c, ref_logp_r, "cal_dpo")
    c = 0.5 / beta
    return -F.logsigmoid(d_c - d_r) + (d_c - c) ** 2 + (d_r + c) ** 2


def sampo(logp_c, logp_r, ref_logp_c=None, ref_logp_r=None, *, len_c=None, len_r=None, beta: float = 0.1) -> Tensor:
    """SamPO (Lu et al. 2024, "Eliminating Biased Length Reliance of Direct Preference Optimization
    via Down-Sampled KL Divergence", EMNLP; its down-sampled DPO objective): DPO on log-ratios
    summed over the same number of tokens in both responses,

        T_m = min(T_c, T_r);  S_c, S_r = T_m token positions of each response drawn uniformly
        without replacement (the shorter response keeps all of its tokens)
        Δ_c^S = Σ_{t∈S_c} (log π_θ − log π_ref)(y_c,t | x, y_c,<t),  Δ_r^S likewise
        L = −log σ(β·(Δ_c^S − Δ_r^S))

    This function receives the subset sums: logp_c, logp_r, ref_logp_c, ref_logp_r are Σ over S_c /
    S_r of the per-token log-probs (the caller draws S with `sampo_positions`; the spec's
    `token_subset` is "sample"), and len_c / len_r, unused here, are the full token counts. Given
    whole-response sums it is plain DPO.
    """
    d_c, d_r = _ratios(logp_c, logp_r, ref_logp_c, ref_logp_r, "sampo")
    return -F.logsigmoid(beta * (d_c - d_r))


def sampo_positions(n_c: int, n_r: int, seed: int) -> tuple[list[int], list[int]]:
    """SamPO's token subsets of one pair: the sorted positions (0-based, within each response) of
    the T_m = min(n_c, n_r) tokens kept of the chosen and of the rejected response. The shorter
    response keeps all its positions; T_m positions of the longer one are drawn uniformly without
    replacement with `random.Random(seed)` (the same seed gives the same subsets)."""
    if n_c < 0 or n_r < 0:
        raise ValueError(f"sampo_positions: token counts must be >= 0, found {n_c}, {n_r}")
    t_m = min(n_c, n_r)
    rng = random.Random(seed)

    def keep(n: int) -> list[int]:
        return list(range(n)) if n == t_m else sorted(rng.sample(range(n), t_m))

    return keep(n_c), keep(n_r)


def _beta_dpo_keep(m: Tensor, m0, sigma: Optional[float], rho: float) -> Tensor:
    """β-DPO's filter: a bool mask keeping k = max(1, ⌊ρ·B⌋) of the B pairs, drawn without
    replacement with probability ∝ exp(−(M_i − M0)²/(2σ²)) (torch's global RNG; uniform when σ is
    missing or 0)."""
    n = m.numel()
    k = max(1, math.floor(rho * n + 1e-9))
    keep = torch.ones(n, dtype=torch.bool, device=m.device)
    if k >= n:
        return keep
    x = m.double()
    if sigma is None or not sigma > 0 or not math.isfinite(sigma):
        weights = torch.ones_like(x)
    else:
        z = -0.5 * ((x - float(m0)) / sigma) ** 2
        weights = torch.exp(z - z.max()).clamp(min=1e-300)  # every pair stays drawable
    keep.zero_()
    keep[torch.multinomial(weights, k, replacement=False)] = True
    return keep


def beta_dpo(
    logp_c,
    logp_r,
    ref_logp_c=None,
    ref_logp_r=None,
    *,
    len_c=None,
    len_r=None,
    beta: float = 0.1,
    beta_dpo_alpha: float = 0.6,
    beta_dpo_rho: float = 0.8,
    state: Optional[BetaDPOState] = None,
) -> Tensor:
    """β-DPO (Wu et al. 2024, "β-DPO: Direct Preference Optimization with Dynamic β", NeurIPS):
    DPO with a β calibrated per batch and a β-guided filter of outlier pairs. With the pairs'
    margins M_i = h_i (detached) and, from `state` (a BetaDPOState, updated with this batch
    first), the running threshold M0 and spread σ:

        keep k = max(1, ⌊ρ·B⌋) of the B pairs, drawn without replacement with
            p_i ∝ exp(−(M_i − M0)²/(2σ²))                                   (ρ = beta_dpo_rho)
        β_b = max(1e-3, β0·(1 + α·(mean_kept(M) − M0)))                      (α = beta_dpo_alpha)
        L_i = (B/k)·(−log σ(β_b·h_i)) if pair i is kept, else 0

    so the batch mean of L is the mean over the kept pairs. Without a state, M0 and σ are this
    batch's mean and standard deviation. β_b is detached. The draw uses torch's global RNG
    (torch.multinomial): a seeded run is reproducible; ρ = 1 keeps every pair (deterministic),
    and then with state=None β_b = β0, plain DPO. M_i is the log-ratio margin h_i, as in the
    authors' code (the paper writes it as the implicit-reward margin β0·h_i; α absorbs the factor,
    and the paper's α values are those of the code). Defaults: α = 0.6, ρ = 0.8 (filtering ratio
    0.2), the authors' example; momentum m = 0.9 lives in the state.
    """
    if not 0 < beta_dpo_rho <= 1:
        raise ValueError(f"beta_dpo: beta_dpo_rho (the fraction of pairs kept) must be in (0, 1], found {beta_dpo_rho}")
    d_c, d_r = _ratios(logp_c, logp_r, ref_logp_c, ref_logp_r, "beta_dpo")
    h = d_c - d_r
    m = h.detach()
    if state is None:
        m0 = m.mean()
        sigma = m.std().item() if m.numel() >= 2 else None
    else:
        m0 = state.update(m)
        sigma = state.std
    keep = _beta_dpo_keep(m, m0, sigma, beta_dpo_rho)
    k = int(keep.sum())
    beta_b = (beta * (1 + beta_dpo_alpha * (m[keep].mean() - m0))).clamp(min=1e-3)
    scale = keep.to(h.dtype) * (m.numel() / k)
    return -F.logsigmoid(beta_b * h) * scale


def tr_dpo(
    logp_c,
    logp_r,
    ref_logp_c=None,
    ref_logp_r=None,
    *,
    len_c=None,
    len_r=None,
    beta: float = 0.1,
    tr_alpha: float = 0.6,
    tr_tau: int = 512,
) -> Tensor:
    """TR-DPO (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment"): DPO
    against a reference that moves towards the policy during training (soft and hard updates),

        L = −log σ(β·h),   h computed with the current π_ref
        every τ optimizer steps:  θ_ref ← α·θ + (1−α)·θ_ref   (in parameter space; α = 1: a hard copy)

    α = tr_alpha ∈ (0, 1], τ = tr_tau ≥ 1 (an integer). This function is the loss (DPO) and checks
    α and τ; the caller keeps the reference and updates it with `mix_reference` on every weight
    (the spec's `moving_reference`), so reference log-probs cannot be precomputed. Defaults: TRL
    1.16's (ref_model_mixup_alpha = 0.6, ref_model_sync_steps = 512).
    """
    if not 0 < tr_alpha <= 1:
        raise ValueError(f"tr_dpo: tr_alpha must be in (0, 1], found {tr_alpha}")
    if not (tr_tau >= 1 and float(tr_tau).is_integer()):
        raise ValueError(f"tr_dpo: tr_tau must be an integer >= 1, found {tr_tau}")
    d_c, d_r = _ratios(logp_c, logp_r, ref_logp_c, ref_logp_r, "tr_dpo")
    return -F.logsigmoid(beta * (d_c - d_r))


def mix_reference(ref: Tensor, policy: Tensor, alpha: float) -> Tensor:
    """TR-DPO's reference update on one parameter tensor (Gorbatovski et al. 2024):

        θ_ref ← α·θ + (1−α)·θ_ref,   α ∈ (0, 1]  (α = 1: a copy of the policy's)

    Returns the new reference tensor (ref's dtype and device; no gradient); apply it to every
    weight of the reference every tr_tau optimizer steps."""
    if not 0 < alpha <= 1:
        raise ValueError(f"mix_reference: alpha must be in (0, 1], found {alpha}")
    with torch.no_grad():
        p = policy.detach().to(dtype=ref.dtype, device=ref.device)
        if alpha == 1:
            return p.clone()
        return alpha * p + (1 - alpha) * ref.detach()


# --------------------------------------------------------------------------------------------
# paired, reference-free
# --------------------------------------------------------------------------------------------


def sigmoid_ref_free(
    logp_c,
    logp_r,
    ref_logp_c=None,
    ref_logp_r=None,
    *,
    len_c=None,
    len_r=None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Reference-free DPO (DPO with a uniform reference; Rafailov et al. 2023, `reference_free`):

    L = −(1−ε)·log σ(β·(logp_c − logp_r)) − ε·log σ(−β·(logp_c − logp_r))
    """
    return _smoothed(beta * (logp_c - logp_r), label_smoothing)


def simpo(
    logp_c, logp_r, ref_logp_c=None, ref_logp_r=None, *, len_c=None, len_r=None, beta: float = 2.0, gamma: float = 1.0
) -> Tensor:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward", eq. 6), γ an absolute target margin as in the paper:

        L = −log σ(β/len_c · logp_c − β/len_r · logp_r − γ)
    """
    n_c = _need(len_c, "len_c (token counts)", "simpo")
    n_r = _need(len_r, "len_r (token counts)", "simpo")
    return -F.logsigmoid(beta * logp_c / n_c - beta * logp_r / n_r - gamma)


def alphapo(
    logp_c,
    logp_r,
    ref_logp_c=None,
    ref_logp_r=None,
    *,
    len_c=None,
    len_r=None,
    beta: float = 2.0,
    gamma: float = 1.0,
    alphapo_alpha: float = 0.25,
) -> Tensor:
    """AlphaPO (Gupta et al. 2025, "AlphaPO: Reward Shape Matters for LLM Alignment", ICML): SimPO
    with a reshaped reward, the α-reward. With the per-token probability p(y) = π(y)^(1/|y|),

        r_α(y) = (1 − p(y)^(−α))/α = (1 − exp(−α·logp/len))/α      (α = alphapo_alpha)
        L = −log σ(β·(r_α(y_c) − r_α(y_r)) − γ)

    γ is an absolute margin, as SimPO's here (TRL's CPOTrainer with `alpha`, loss_type "simpo",
    subtracts simpo_gamma/β inside β·(…): the same). α = 0 is SimPO exactly (r = logp/len), and
    α → 0 tends to it. The exponent is capped (`_alpha_reward`) so the loss stays finite. The
    implicit reward logged for it is SimPO's, β/|y|·log π (r_α is a monotone function of it), not
    β·r_α. The paper finds α > 0 reduces likelihood displacement; the default α = 0.25 is a value
    in that range, not one read from the paper's per-model settings.
    """
    _need(len_c, "len_c (token counts)", "alphapo")
    _need(len_r, "len_r (token counts)", "alphapo")
    if alphapo_alpha == 0:
        return simpo(logp_c, logp_r, len_c=len_c, len_r=len_r, beta=beta, gamma=gamma)
    m_c, m_r = logp_c / len_c, logp_r / len_r
    return -F.logsigmoid(beta * (_alpha_reward(m_c, alphapo_alpha) - _alpha_reward(m_r, alphapo_alpha)) - gamma)


def _alpha_reward(m: Tensor, alpha: float) -> Tensor:
    """(1 − exp(−α·m))/α = −expm1(−α·m)/α, the exponent capped at half its overflow value for m's
    dtype (float64: 354, i.e. a mean token log-prob below −354/α), so β·r stays finite."""
    cap = 0.5 * math.log(torch.finfo(m.dtype).max)
    return -torch.expm1(torch.clamp(-alpha * m, max=cap)) / alpha


def cpo(
    logp_c, logp_r, ref_logp_c=None, ref_logp_r=None, *, len_c=None, len_r=None, beta: float = 0.1, alpha: float = 1.0
) -> Tensor:
    """CPO (Xu et al. 2024, "Contrastive Preference Optimization", eq. 6): reference-free DPO plus
    a behaviour-cloning NLL on chosen:

        L = −log σ(β·(logp_c − logp_r)) + α·NLL,   NLL = −logp_c/len_c
    """
    out = -F.logsigmoid(beta * (logp_c - logp_r))
    if alpha:
        out = out + alpha * nll(logp_c, len_c, "cpo")
    return out


def orpo(
    logp_c, logp_r, ref_logp_c=None, ref_logp_r=None, *, len_c=None, len_r=None, orpo_lambda: float = 0.1
) -> Tensor:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model", eq. 6–7), odds from per-token average log-probs m = logp/len:

        log odds(y) = m − log(1 − exp(m))
        L = NLL − λ·log σ(log odds_c − log odds_r),   NLL = −logp_c/len_c

    log(1 − exp(m)) is computed stably (log1mexp).
    """
    m_c = logp_c / _need(len_c, "len_c (token counts)", "orpo")
    m_r = logp_r / _need(len_r, "len_r (token counts)", "orpo")
    log_odds = (m_c - log1mexp(m_c)) - (m_r - log1mexp(m_r))
    return -m_c - orpo_lambda * F.logsigmoid(log_odds)


def sft(logp_c, logp_r, ref_logp_c=None, ref_logp_r=None, *, len_c=None, len_r=None) -> Tensor:
    """Supervised fine-tuning on the chosen response (the generation term of MPO):

    L = NLL = −logp_c/len_c
    """
    return nll(logp_c, len_c, "sft")


# --------------------------------------------------------------------------------------------
# unpaired losses: one completion per example, label True = desirable
# --------------------------------------------------------------------------------------------


def _kto_z0(kl_logp, kl_ref_logp) -> Union[Tensor, float]:
    if kl_logp is None or kl_ref_logp is None:
        return 0.0
    return (kl_logp - kl_ref_logp).mean().clamp(min=0).detach()


def kto(
    logp: Tensor,
    ref_logp: Tensor,
    label: Tensor,
    *,
    kl_logp: Optional[Tensor] = None,
    kl_ref_logp: Optional[Tensor] = None,
    len: Optional[Tensor] = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    state=None,
) -> Tensor:
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"),
    Δ = logp − ref_logp:

        z0 = max(0, mean(kl_logp − kl_ref_logp)), detached   (KL estimate from mismatched
                                                               prompt/completion pairs; 0 if not given)
        L = λ_D·(1 − σ(β·(Δ − z0)))   if label (desirable)
        L = λ_U·(1 − σ(β·(z0 − Δ)))   otherwise

    z0 is in log-ratio units (β·z0 is the reference point in reward units), as in the paper.
    """
    label = label.bool()
    d = logp - ref_logp
    z0 = _kto_z0(kl_logp, kl_ref_logp)
    good = desirable_weight * (1 - torch.sigmoid(beta * (d - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - d)))
    return torch.where(label, good, bad)


def bco(
    logp: Tensor,
    ref_logp: Tensor,
    label: Tensor,
    *,
    kl_logp: Optional[Tensor] = None,
    kl_ref_logp: Optional[Tensor] = None,
    len: Optional[Tensor] = None,
    beta: float = 0.1,
    state: Optional[BCOState] = None,
) -> Tensor:
    """BCO (Jung et al. 2024, "Binary Classifier Optimization for LLM Alignment"), reward
    r = β·(logp − ref_logp), shifted by δ:

        L = −log σ(r − δ)      if label (desirable)
        L = −log σ(−(r − δ))   otherwise

    δ = mean reward over desirable and undesirable examples, detached: of this batch (state=None)
    or the running mean kept in `state` (a BCOState, updated with this batch first). The paper's
    optional density-ratio reweighting (UDM) is not included.
    """
    label = label.bool()
    r = beta * (logp - ref_logp)
    delta = _reward_shift(r, state)
    return torch.where(label, -F.logsigmoid(r - delta), -F.logsigmoid(-(r - delta)))


def apo_zero_unpaired(
    logp: Tensor,
    ref_logp: Tensor,
    label: Tensor,
    *,
    kl_logp: Optional[Tensor] = None,
    kl_ref_logp: Optional[Tensor] = None,
    len: Optional[Tensor] = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    state=None,
) -> Tensor:
    """APO-zero on unpaired labels (D'Oosterlinck et al. 2024, eq. 7 split per example),
    Δ = logp − ref_logp:

        L = λ_D·(1 − σ(β·Δ))   if label (desirable)
        L = λ_U·σ(β·Δ)         otherwise
    """
    label = label.bool()
    s = torch.sigmoid(beta * (logp - ref_logp))
    return torch.where(label, desirable_weight * (1 - s), undesirable_weight * s)


# --------------------------------------------------------------------------------------------
# modifiers
# --------------------------------------------------------------------------------------------


def with_nll(base_fn: Callable[..., Tensor], rpo_alpha: float = 1.0) -> Callable[..., Tensor]:
    """RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"): a paired loss plus an
    NLL term on chosen,

        L = L_base + rpo_alpha·NLL,   NLL = −logp_c/len_c

    Returns a paired loss function with base_fn's hyperparameters and a keyword `rpo_alpha`
    (default: the value given here).
    """

    def fn(
        logp_c,
        logp_r,
        ref_logp_c=None,
        ref_logp_r=None,
        *,
        len_c=None,
        len_r=None,
        rpo_alpha: float = rpo_alpha,
        **hyper,
    ):
        out = base_fn(logp_c, logp_r, ref_logp_c, ref_logp_r, len_c=len_c, len_r=len_r, **hyper)
        if rpo_alpha:
            out = out + rpo_alpha * nll(logp_c, len_c, "rpo")
        return out

    params = [p for p in inspect.signature(base_fn).parameters.values()]
    extra = inspect.Parameter("rpo_alpha", inspect.Parameter.KEYWORD_ONLY, default=rpo_alpha)
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    fn.__signature__ = inspect.Signature(params[:at] + [extra] + params[at:])
    fn.__name__ = f"{getattr(base_fn, '__name__', 'loss')}_with_nll"
    fn.__doc__ = (
        f"{getattr(base_fn, '__name__', 'loss')} + rpo_alpha·NLL (RPO, Pang et al. 2024):\n\n"
        f"    L = L_base + rpo_alpha·(−logp_c/len_c)\n\nbase:\n{base_fn.__doc__ or ''}"
    )
    return fn


def wpo_weights(
    logp_c: Tensor,
    logp_r: Tensor,
    len_c: Tensor,
    len_r: Tensor,
    *,
    sq_mass_c: Optional[Tensor] = None,
    sq_mass_r: Optional[Tensor] = None,
    clamp_max: float = 1.0,
) -> Tensor:
    """WPO pair weights (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference
    Optimization", eq. 2), detached:

        w = min(clamp_max, exp( (logp_c − S_c)/len_c + (logp_r − S_r)/len_r ))

    i.e. the product of the per-token geometric-mean probabilities of chosen and rejected under the
    current policy, so pairs the policy itself would likely generate count more. Inputs:
    logp_c/logp_r the policy's summed log-probs (this step's), len_c/len_r token counts, and
    optionally sq_mass_c/sq_mass_r = Σ_t log Σ_v π(v | prefix_t)² (the paper's "weight
    alignment", which needs the full next-token distributions; 0 if not given). Use as
    `(wpo_weights(...) * per_pair_loss).mean()`.
    """
    a = logp_c if sq_mass_c is None else logp_c - sq_mass_c
    b = logp_r if sq_mass_r is None else logp_r - sq_mass_r
    w = torch.exp(a / len_c + b / len_r)
    if clamp_max is not None:
        w = w.clamp(max=clamp_max)
    return w.detach()


def ld_logps(logp_prefix: Tensor, logp_excess: Tensor, ld_alpha: float) -> Tensor:
    """LD-DPO length desensitisation (Liu et al. 2024, "Length Desensitization in Direct
    Preference Optimization"): the log-prob of a response is split at the shared length
    l_p = min(len_c, len_r) of its pair, and the tokens beyond it are down-weighted:

        logp_LD = logp_prefix + ld_alpha·logp_excess

    logp_prefix = Σ_{t ≤ l_p} log π(y_t | …),  logp_excess = Σ_{t > l_p} log π(y_t | …) (0 for the
    shorter response). Apply it to the policy and the reference alike, then feed any paired loss.
    ld_alpha ∈ [0, 1]; 1 is plain DPO.
    """
    return logp_prefix + ld_alpha * logp_excess


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------

NOT_HYPERPARAMETERS = ("ref_logp_c", "ref_logp_r", "len_c", "len_r", "state", "kl_logp", "kl_ref_logp", "len")


def signature_defaults(fn: Callable[..., Tensor]) -> dict:
    """The hyperparameters of loss function `fn` with their defaults, read from its signature (the
    one place a default is written)."""
    return {
        k: p.default
        for k, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty and k not in NOT_HYPERPARAMETERS
    }


@dataclass(frozen=True)
class LossSpec:
    """Every trait of a loss that the rest of prefopt reads: what it needs, what it computes, and
    the form of its implicit reward (see `implicit_rewards`)."""

    name: str
    fn: Callable[..., Tensor]
    needs_reference: bool = True  # needs ref log-probs (ref_logp_c / ref_logp_r, or ref_logp)
    paired: bool = True  # True: chosen/rejected pairs; False: unpaired good/bad labels
    # hyperparameter -> default, from fn's signature (a combined loss: the union of its parts')
    hyperparameters: dict = field(default_factory=dict, compare=False)
    # the class of the state it takes as `state=` (a LossState kept by the caller across steps:
    # BCOState, BetaDPOState); None: stateless
    state_class: Optional[type] = None
    kl_baseline: bool = False  # unpaired: needs mismatched completions for the KL estimate z0 (KTO)
    per_pair: bool = True  # False: its per-example losses are order statistics (AOT), not one per pair
    # the implicit reward is per token, β/|y|·(log π − log π_ref), rather than summed: True, False, or
    # the name of the boolean hyperparameter that decides (IPO's ipo_normalize)
    per_token_reward: Union[bool, str] = False
    # the tokens its log-prob sums cover: None, the whole responses; "sample", SamPO's: T_m =
    # min(len_c, len_r) positions of each response drawn by `sampo_positions` (the caller sums
    # over them; len_c / len_r stay the full token counts)
    token_subset: Optional[str] = None
    # the reference moves during training (TR-DPO): the caller keeps a reference model and every
    # tr_tau optimizer steps moves each of its weights with `mix_reference(ref, policy, tr_alpha)`
    moving_reference: bool = False
    # hyperparameters that evaluation uses instead of the run's (β-DPO: ρ = 1, every pair kept, so
    # evaluating neither draws at random nor advances the training RNG)
    eval_hyperparameters: dict = field(default_factory=dict, compare=False)

    @property
    def stateful(self) -> bool:
        """Whether it takes `state=` (a `state_class` object kept by the caller)."""
        return self.state_class is not None

    def reward_is_per_token(self, hyper: Optional[dict] = None) -> bool:
        """Whether the implicit reward is per token under hyperparameters `hyper` (defaults if None)."""
        if isinstance(self.per_token_reward, str):
            values = {**self.hyperparameters, **(hyper or {})}
            return values[self.per_token_reward] is not False
        return self.per_token_reward


def _spec(name, fn, **traits) -> LossSpec:
    return LossSpec(name, fn, hyperparameters=signature_defaults(fn), **traits)


def implicit_rewards(
    spec: LossSpec, hyper: dict, logps: Tensor, ref_logps: Optional[Tensor], lengths: Tensor
) -> Tensor:
    """The implicit reward of each response under loss `spec` with hyperparameters `hyper` — one
    definition for the training log, the failure monitor and `prefopt eval` alike:

        r = β·(log π − log π_ref)          losses with a reference (DPO, KTO, ...)
        r = β·log π                        reference-free losses (CPO, ORPO, ...)
        r = β/|y|·(...)                    losses whose margin is per token (SimPO, sigmoid_norm, IPO)

    β is hyper["beta"] (1 for a loss without one); `lengths` are the response token counts.
    Returned in the dtype of `logps`.
    """
    x = logps
    if spec.needs_reference and ref_logps is not None:
        x = x - ref_logps.to(x.dtype)
    if spec.reward_is_per_token(hyper):
        x = x / lengths.to(x.dtype).clamp(min=1)
    return reward_scale(hyper) * x


def reward_scale(hyper: dict) -> float:
    """β of the implicit reward: hyper["beta"], or 1 for a loss without one."""
    beta = hyper.get("beta")
    return 1.0 if beta is None else float(beta)


def reward_formula(spec: LossSpec, hyper: dict) -> str:
    """The implicit reward of `spec` as text, e.g. "β·(log π − log π_ref)"."""
    scale = "β/|y|" if spec.reward_is_per_token(hyper) else "β"
    return f"{scale}·(log π − log π_ref)" if spec.needs_reference else f"{scale}·log π"


rpo = with_nll(sigmoid, rpo_alpha=1.0)
rpo.__name__ = "rpo"

_SPECS = [
    _spec("sigmoid", sigmoid),
    _spec("robust", robust),
    _spec("ipo", ipo, per_token_reward="ipo_normalize"),
    _spec("hinge", hinge),
    _spec("exo_pair", exo_pair),
    _spec("nca_pair", nca_pair),
    _spec("bco_pair", bco_pair, state_class=BCOState),
    _spec("sppo_hard", sppo_hard),
    _spec("aot", aot, per_pair=False),
    _spec("aot_pair", aot_pair, per_pair=False),
    _spec("apo_zero", apo_zero),
    _spec("apo_down", apo_down),
    _spec("discopop", discopop),
    _spec("sigmoid_norm", sigmoid_norm, per_token_reward=True),
    _spec("dpop", dpop),
    _spec("cal_dpo", cal_dpo),
    _spec("sampo", sampo, token_subset="sample"),
    _spec("beta_dpo", beta_dpo, state_class=BetaDPOState, eval_hyperparameters={"beta_dpo_rho": 1.0}),
    _spec("tr_dpo", tr_dpo, moving_reference=True),
    _spec("sigmoid_ref_free", sigmoid_ref_free, needs_reference=False),
    _spec("simpo", simpo, needs_reference=False, per_token_reward=True),
    _spec("alphapo", alphapo, needs_reference=False, per_token_reward=True),
    _spec("cpo", cpo, needs_reference=False),
    _spec("orpo", orpo, needs_reference=False),
    _spec("sft", sft, needs_reference=False),
    _spec("rpo", rpo),
    _spec("kto", kto, paired=False, kl_baseline=True),
    _spec("bco", bco, paired=False, state_class=BCOState),
    _spec("apo_zero_unpaired", apo_zero_unpaired, paired=False),
]

REGISTRY: dict[str, LossSpec] = {s.name: s for s in _SPECS}

ALIASES = {
    "dpo": "sigmoid",
    "cdpo": "sigmoid",  # sigmoid with label_smoothing = ε
    "f_dpo": "sigmoid",  # sigmoid with f_divergence
    "rdpo": "robust",
    "slic": "hinge",
    "exo": "exo_pair",
    "nca": "nca_pair",
    "sppo": "sppo_hard",
    "dpo_norm": "sigmoid_norm",
    "dpo_ref_free": "sigmoid_ref_free",
}


def get(name: str) -> LossSpec:
    """The registered loss called `name` or one of its ALIASES (KeyError naming the known ones
    otherwise)."""
    key = ALIASES.get(name, name)
    if key not in REGISTRY:
        raise KeyError(
            f"unknown loss '{name}'; known: {', '.join(sorted(REGISTRY))} (aliases: {', '.join(sorted(ALIASES))})"
        )
    return REGISTRY[key]


def names(paired: Optional[bool] = None, needs_reference: Optional[bool] = None) -> list[str]:
    """Sorted names of the registered losses, optionally only the paired / unpaired ones and only
    those that do / do not need a reference model."""
    return sorted(
        n
        for n, s in REGISTRY.items()
        if (paired is None or s.paired == paired) and (needs_reference is None or s.needs_reference == needs_reference)
    )


def combine(parts: Iterable[tuple], name: Optional[str] = None) -> LossSpec:
    """A weighted sum of paired losses, as a LossSpec (MPO, Wang et al. 2024, "Enhancing the
    Reasoning Ability of Multimodal LLMs via Mixed Preference Optimization"):

        L = Σ_k w_k·L_k

    `parts` is [(name or LossSpec, weight), ...]. The result needs what any part needs; its
    hyperparameters are the union of the parts' (a shared name, e.g. beta, is shared; the first
    part's default wins). `state` is handed to every stateful part; their state classes must be
    the same, and so must the parts' token subsets (`token_subset`). The reference moves if any
    part's does (TR-DPO).
    """
    specs = []
    for part, w in parts:
        spec = get(part) if isinstance(part, str) else part
        if not spec.paired:
            raise ValueError(f"combine: '{spec.name}' is unpaired; only paired losses can be combined")
        specs.append((spec, float(w)))
    if not specs:
        raise ValueError("combine: no losses given")
    hyper: dict = {}
    for spec, _ in specs:
        for k, v in spec.hyperparameters.items():
            hyper.setdefault(k, v)
    state_classes = {s.state_class for s, _ in specs if s.state_class is not None}
    if len(state_classes) > 1:
        names = ", ".join(f"{s.name} ({s.state_class.__name__})" for s, _ in specs if s.state_class is not None)
        raise ValueError(f"combine: the stateful parts keep different states ({names}); one state is handed to all")
    subsets = {s.token_subset for s, _ in specs}
    if len(subsets) > 1:
        names = ", ".join(f"{s.name} ({s.token_subset or 'whole responses'})" for s, _ in specs)
        raise ValueError(f"combine: the parts score different token subsets ({names})")

    def fn(logp_c, logp_r, ref_logp_c=None, ref_logp_r=None, *, len_c=None, len_r=None, state=None, **kw):
        unknown = set(kw) - set(hyper)
        if unknown:
            raise TypeError(f"combined loss got unexpected hyperparameters {sorted(unknown)}")
        total = 0
        for spec, w in specs:
            sub = {k: v for k, v in kw.items() if k in spec.hyperparameters}
            if spec.stateful:
                sub["state"] = state
            total = total + w * spec.fn(logp_c, logp_r, ref_logp_c, ref_logp_r, len_c=len_c, len_r=len_r, **sub)
        return total

    label = " + ".join(f"{w:g}·{s.name}" for s, w in specs)
    fn.__name__ = name or "combined"
    fn.__doc__ = f"Weighted sum of paired losses (MPO-style):\n\n    L = {label}\n"
    return LossSpec(
        name or label,
        fn,
        needs_reference=any(s.needs_reference for s, _ in specs),
        paired=True,
        hyperparameters=hyper,
        state_class=next(iter(state_classes), None),
        per_pair=all(s.per_pair for s, _ in specs),
        token_subset=next(iter(subsets)),
        moving_reference=any(s.moving_reference for s, _ in specs),
        eval_hyperparameters={k: v for s, _ in specs for k, v in s.eval_hyperparameters.items()},
    )


REGISTRY["mpo"] = combine([("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0)], name="mpo")
