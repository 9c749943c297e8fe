"""The preference-loss family: small pure functions on per-sequence log-probabilities.

Notation (all tensors have one entry per pair, shape [B]):
    logp_c, logp_r          summed log π_θ(y|x) of the chosen / rejected response
    ref_logp_c, ref_logp_r  the same under the frozen reference π_ref
    Δ_c = logp_c − ref_logp_c,  Δ_r = logp_r − ref_logp_r,  h = Δ_c − Δ_r

Each function returns the per-pair loss (shape [B]); the trainer takes the mean. Use them in your
own loop:

    from prefopt import losses
    spec = losses.get("sigmoid")
    loss = spec.fn(logp_c, logp_r, ref_logp_c, ref_logp_r, beta=0.1).mean()

The registry records what each loss needs, so the trainer loads a reference only when needed
and refuses data of the wrong shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def sigmoid(logp_c: Tensor, logp_r: Tensor, ref_logp_c: Tensor, ref_logp_r: Tensor, *,
            beta: float = 0.1, label_smoothing: float = 0.0) -> Tensor:
    """DPO (Rafailov et al. 2023), with cDPO label smoothing ε (Mitchell 2023):

        L = −(1−ε)·log σ(β·h) − ε·log σ(−β·h),   h = (logp_c − ref_logp_c) − (logp_r − ref_logp_r)

    ε = 0 is plain DPO.
    """
    h = (logp_c - ref_logp_c) - (logp_r - ref_logp_r)
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: Callable[..., Tensor]
    needs_reference: bool = True  # needs ref_logp_c / ref_logp_r
    paired: bool = True  # True: chosen/rejected pairs; False: unpaired good/bad labels
    hyperparameters: tuple = ("beta",)  # keys of LossConfig passed to fn


REGISTRY: dict[str, LossSpec] = {
    "sigmoid": LossSpec("sigmoid", sigmoid, hyperparameters=("beta", "label_smoothing")),
}
ALIASES = {"dpo": "sigmoid"}


def get(name: str) -> LossSpec:
    """The registered loss called `name` (KeyError naming the known ones otherwise)."""
    name = ALIASES.get(name, name)
    if name not in REGISTRY:
        raise KeyError(f"unknown loss '{name}'; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]
