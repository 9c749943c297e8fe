"""Selective activation checkpointing: recompute each decoder layer's MLP in the backward pass.

The MLP's intermediates (gate, up, activation, product: 4 × intermediate_size values per token per
layer, about 60 % of a Llama-style layer's saved activations) are dropped after the forward and
recomputed from the MLP's input when its gradient is needed. The MLP forward is about two thirds
of a layer's matmuls; on SmolLM2-135M (2-core CPU, docs/benchmarks.md) a step took ~10 % longer
than without checkpointing, whole layers ~15-25 % longer, for less memory saved (full fine-tune
4.1 -> 3.7 GB here, 3.3 GB with whole layers). The recomputation is exact: same inputs, same
autocast state, no dropout in these MLPs.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def checkpoint_mlps(model) -> int:
    """Wrap the forward of every `*.mlp` submodule of `model` (a transformers causal LM, bare or
    peft-wrapped) so that it is checkpointed while training with gradients; returns how many."""
    count = 0
    for name, module in model.named_modules():
        if not name.endswith(".mlp") or getattr(module, "_prefopt_checkpointed", False):
            continue
        inner = module.forward

        def forward(*args, _inner=inner, _module=module, **kwargs):
            """The MLP's forward, checkpointed while training with gradients."""
            if _module.training and torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        module.forward = forward
        module._prefopt_checkpointed = True
        count += 1
    return count
