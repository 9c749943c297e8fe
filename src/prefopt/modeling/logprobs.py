"""The log-prob engine: per-sequence summed log-probabilities and token counts from a batch.

One forward of the model over the collated rows. The attention mask is built from document and
branch ids: token i may see token j when j ≤ i, both belong to the same example, and j is in the
prompt or in i's own response. The final hidden states of scored positions only go through the
lm-head, chunk by chunk under activation checkpointing, so the full batch × sequence × vocabulary
logits tensor is never built, in forward or in backward.

We go through the model's own forward (with `logits_to_keep=1`, which makes its own lm-head work
negligible) and capture the decoder's output with a hook, so DDP's gradient hooks and peft's
adapters behave as in any ordinary forward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def unwrap(model):
    """The underlying transformers CausalLM under DDP / peft wrappers."""
    while hasattr(model, "module") and not hasattr(model, "get_decoder"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def attention_mask(doc_ids: torch.Tensor, branch_ids: torch.Tensor, boolean: bool, dtype=torch.float32) -> torch.Tensor:
    """[R, 1, T, T] mask: True (or 0.0) where query i may attend key j."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    key_branch = branch_ids[:, None, :]
    visible = (key_branch == 0) | (key_branch == branch_ids[:, :, None])
    allowed = causal & same_doc & visible
    allowed |= torch.eye(T, dtype=torch.bool, device=doc_ids.device)  # padding sees itself: no NaN
    allowed = allowed[:, None]
    if boolean:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=doc_ids.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _token_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


def token_logps(hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """log p(targets[n] | hidden[n]) for N positions, at most `chunk` rows of logits at a time."""
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    if chunk <= 0 or hidden.shape[0] <= chunk:
        return _token_logps(hidden, weight, bias, targets)
    out = []
    for s in range(0, hidden.shape[0], chunk):
        h, t = hidden[s:s + chunk], targets[s:s + chunk]
        if torch.is_grad_enabled():
            out.append(checkpoint(_token_logps, h, weight, bias, t, use_reentrant=False))
        else:
            out.append(_token_logps(h, weight, bias, t))
    return torch.cat(out)


def sequence_logps(model, batch: dict, chunk: int = 1024) -> dict:
    """Run `model` on a collated batch; return per-sequence `logps` (sum), `lengths`, `mean_logps`."""
    causal_lm = unwrap(model)
    decoder = causal_lm.get_decoder()
    lm_head = causal_lm.get_output_embeddings()
    boolean = causal_lm.config._attn_implementation == "sdpa"
    dtype = next(causal_lm.parameters()).dtype
    mask = attention_mask(batch["doc_ids"], batch["branch_ids"], boolean, dtype)

    captured = {}

    def hook(_module, _args, output):
        captured["h"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = decoder.register_forward_hook(hook)
    try:
        model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"],
              logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    hidden = captured["h"].flatten(0, 1)[batch["score_src"]]
    tok = token_logps(hidden, lm_head, batch["score_tgt"], chunk)
    n = int(batch["n_seqs"])
    seq = batch["score_seq"]
    logps = torch.zeros(n, dtype=tok.dtype, device=tok.device).index_add(0, seq, tok)
    lengths = torch.bincount(seq, minlength=n).to(tok.dtype)
    return {"logps": logps, "lengths": lengths, "mean_logps": logps / lengths.clamp(min=1)}
