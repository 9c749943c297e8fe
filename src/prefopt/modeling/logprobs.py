"""The log-prob engine: per-sequence summed log-probabilities and token counts from a batch.

One forward of the model over the collated rows. The attention mask is built from document and
branch ids: token i may see token j when j ≤ i, both belong to the same example, and j is in the
prompt or in i's own response. The final hidden states of scored positions only go through the
lm-head, chunk by chunk under activation checkpointing, so the full batch × sequence × vocabulary
logits tensor is never built, in forward or in backward.

We go through the model's own forward (with `logits_to_keep=1`, and a detached last position as
its lm-head's input, which makes its own head's work negligible and keeps nothing for the backward)
and capture the decoder's output with a hook, so DDP's gradient hooks and peft's adapters behave as
in any ordinary forward.
"""

from __future__ import annotations

import contextlib
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


def adapter_disabled(model, disabled: bool = True):
    """Context: the reference (adapter off) when `disabled` and the model is a peft model."""
    if disabled and hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    return contextlib.nullcontext()


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


def _token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    sq_mass: bool = False,
):
    # The lm-head runs in float32 whatever the surrounding autocast: log-probs then do not depend on
    # whether the caller's autocast covers this function (it covers the reference precompute but, in
    # the Trainer, only the model's own forward), so policy and reference log-probs stay comparable.
    with torch.autocast(hidden.device.type, enabled=False):
        logits = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    logp = logits.log_softmax(-1)
    tok = logp.gather(-1, targets[:, None]).squeeze(-1)
    if not sq_mass:
        return tok
    with torch.no_grad():  # log Σ_v π(v|·)², for WPO's weight alignment; never differentiated
        sq = torch.logsumexp(2 * logp.detach(), -1)
    return tok, sq


def token_logps(
    hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor, chunk: int = 1024, sq_mass: bool = False
):
    """log p(targets[n] | hidden[n]) for N positions, at most `chunk` rows of logits at a time.

    With `sq_mass`, also return log Σ_v p(v | hidden[n])² per position (detached), computed from the
    same chunk of logits: (token log-probs, squared-mass log) as a tuple."""
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    if chunk <= 0 or hidden.shape[0] <= chunk:
        return _token_logps(hidden, weight, bias, targets, sq_mass)
    out = []
    for s in range(0, hidden.shape[0], chunk):
        h, t = hidden[s : s + chunk], targets[s : s + chunk]
        if torch.is_grad_enabled():
            out.append(checkpoint(_token_logps, h, weight, bias, t, sq_mass, use_reentrant=False))
        else:
            out.append(_token_logps(h, weight, bias, t, sq_mass))
    if sq_mass:
        return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])
    return torch.cat(out)


def sequence_logps(model, batch: dict, chunk: int = 1024, sq_mass: bool = False) -> dict:
    """Run `model` on a collated batch; return per-sequence `logps` (sum), `lengths`, `mean_logps`.

    Also, only when asked: `subset_logps`, the sum over the tokens flagged in `batch["score_subset"]`
    (a collator built with a token subset flags them: LD-DPO's shared-length prefix, SamPO's
    sample), and with `sq_mass=True` `sq_mass` = Σ_t log Σ_v π(v | prefix_t)² per sequence
    (detached; WPO's weight alignment), computed inside the chunked lm-head."""
    causal_lm = unwrap(model)
    decoder = causal_lm.get_decoder()
    lm_head = causal_lm.get_output_embeddings()
    boolean = causal_lm.config._attn_implementation == "sdpa"
    dtype = next(causal_lm.parameters()).dtype
    mask = attention_mask(batch["doc_ids"], batch["branch_ids"], boolean, dtype)
    decoder_output = _decoder_output(model, decoder, batch, mask)
    hidden = decoder_output.flatten(0, 1)[batch["score_src"]]
    tok = token_logps(hidden, lm_head, batch["score_tgt"], chunk, sq_mass=sq_mass)
    sq = None
    if sq_mass:
        tok, sq = tok
    return _per_sequence_sums(batch, tok, sq)


def _decoder_output(model, decoder, batch: dict, mask: torch.Tensor) -> torch.Tensor:
    """The decoder's final hidden states [R, T, H] from one forward of `model` through its own
    forward (with `logits_to_keep=1`), captured by a hook on `decoder`."""
    captured = {}
    handle = decoder.register_forward_hook(_capture_hook(captured))
    try:
        model(
            input_ids=batch["input_ids"],
            attention_mask=mask,
            position_ids=batch["position_ids"],
            logits_to_keep=1,
            use_cache=False,
        )
    finally:
        handle.remove()
    return captured["h"]


def _capture_hook(captured: dict):
    """A forward hook for the decoder that stores its output in `captured["h"]`."""

    def hook(_module, _args, output):
        """Keep the decoder's output for our chunked head; hand the model's own lm-head one
        detached position per row, so it keeps nothing for the backward (no bf16 copy of the
        vocabulary matrix under autocast) and sends no gradient into the tied embedding."""
        if hasattr(output, "last_hidden_state"):
            captured["h"] = output.last_hidden_state
            output.last_hidden_state = captured["h"][:, -1:].detach()
            return output
        captured["h"] = output[0]
        return (output[0][:, -1:].detach(),) + tuple(output[1:])

    return hook


def _per_sequence_sums(batch: dict, tok: torch.Tensor, sq: Optional[torch.Tensor]) -> dict:
    """The scored tokens' log-probs `tok` (and squared-mass logs `sq`) summed per sequence."""
    n = int(batch["n_seqs"])
    seq = batch["score_seq"]
    logps = torch.zeros(n, dtype=tok.dtype, device=tok.device).index_add(0, seq, tok)
    lengths = torch.bincount(seq, minlength=n).to(tok.dtype)
    out = {"logps": logps, "lengths": lengths, "mean_logps": logps / lengths.clamp(min=1)}
    if "score_subset" in batch:
        flag = batch["score_subset"]
        out["subset_logps"] = torch.zeros(n, dtype=tok.dtype, device=tok.device).index_add(0, seq[flag], tok[flag])
    if sq is not None:
        out["sq_mass"] = torch.zeros(n, dtype=sq.dtype, device=sq.device).index_add(0, seq, sq)
    return out


def collated_logps(model, collator, examples: list[dict], device: torch.device, chunk: int, autocast_dtype) -> dict:
    """sequence_logps of `examples` collated by `collator` onto `device`, under autocast to
    `autocast_dtype` (None: no autocast, float32)."""
    batch = {k: v.to(device) for k, v in collator(examples).items()}
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        return sequence_logps(model, batch, chunk)
