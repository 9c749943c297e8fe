"""The log-prob engine: per-sequence summed log-probabilities and token counts from a batch.

One forward of the model over the collated rows. Attention follows the document and branch ids:
token i may see token j when j ≤ i, both belong to the same example, and j is in the prompt or in
i's own response. Two paths compute it, equal to float rounding (tests/test_attention.py):

    segments  (sdpa models) plain causal SDPA calls over [prompt ; response k], no T×T tensor
              anywhere (modeling/attention.py)
    dense     one [R, 1, T, T] mask per batch (`attention_mask`): boolean for sdpa, additive float
              for eager and other implementations, which always take this path

`set_attention(model, path)` (train.attention) picks the path for a model: "auto" (the default,
DEFAULT_ATTENTION) takes the dense mask for batches narrower than SEGMENTS_FROM tokens and segment
attention from there, "segments" and "dense" always theirs. A model whose attention segments cannot
compute (a sliding window the rows exceed, logit soft-capping, attention sinks) falls back to the
dense mask on its first forward, with a warning.

The final hidden states of scored positions only go through the lm-head, chunk by chunk under
activation checkpointing, so the full batch × sequence × vocabulary logits tensor is never built,
in forward or in backward.

We go through the model's own forward (with `logits_to_keep=1`, and a detached last position as
its lm-head's input, which makes its own head's work negligible and keeps nothing for the backward)
and capture the decoder's output with a hook, so DDP's gradient hooks and peft's adapters behave as
in any ordinary forward.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from prefopt.modeling import attention

ATTENTION_PATHS = ("auto", "segments", "dense")  # train.attention; see the module docstring
DEFAULT_ATTENTION = "auto"
# "auto" takes segment attention for batches of at least this many tokens per row, the dense mask
# below. Measured on the 2-core CPU (docs/benchmarks.md): up to 512 tokens the dense path is as fast
# or faster (+3 to +9 % time for segments at 512), from 1k segment attention is faster (−3 % at 1k,
# −20 to −28 % at 2k) and the mask, which grows as T², is never built. Below the threshold "auto" is
# the dense path bit for bit, so the figures the docs quote at 256 tokens hold for the default.
SEGMENTS_FROM = 1024

log = logging.getLogger("prefopt")


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


def set_attention(model, path: str) -> None:
    """Make the engine compute `model`'s attention by `path` ("auto", "segments" or "dense"; see the
    module docstring). Segment attention applies to sdpa models; others keep the dense path."""
    if path not in ATTENTION_PATHS:
        raise ValueError(f"attention path must be one of {', '.join(ATTENTION_PATHS)}, found {path!r}")
    unwrap(model)._prefopt_attention = path


def attention_setting(model) -> str:
    """The path set for `model` ("auto", "segments" or "dense"), as it applies to it: "dense" for a
    model whose attention is not sdpa (or already segment attention)."""
    causal_lm = unwrap(model)
    wanted = getattr(causal_lm, "_prefopt_attention", DEFAULT_ATTENTION)
    sdpa = causal_lm.config._attn_implementation in ("sdpa", attention.NAME)
    return wanted if sdpa else "dense"


def attention_path(model, width: int = 0) -> str:
    """The path the engine takes for `model` on a batch of `width` tokens per row: "segments" or
    "dense" (attention_setting; "auto" is segments from SEGMENTS_FROM tokens)."""
    setting = attention_setting(model)
    if setting == "auto":
        return "segments" if width >= SEGMENTS_FROM else "dense"
    return setting


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


def sequence_logps(model, batch: dict, chunk: int = 1024, sq_mass: bool = False, tokens: bool = False) -> dict:
    """Run `model` on a collated batch; return per-sequence `logps` (sum), `lengths`, `mean_logps`.
    With `tokens`, also `token_logps`: the log-prob of every scored token, flat, in the batch's
    order (each sequence's tokens together and in order; `padded_tokens` lays them out [N, T]).

    Also, only when asked: `subset_logps`, the sum over the tokens flagged in `batch["score_subset"]`
    (a collator built with a token subset flags them: LD-DPO's shared-length prefix, SamPO's
    sample), and with `sq_mass=True` `sq_mass` = Σ_t log Σ_v π(v | prefix_t)² per sequence
    (detached; WPO's weight alignment), computed inside the chunked lm-head."""
    causal_lm = unwrap(model)
    decoder = causal_lm.get_decoder()
    lm_head = causal_lm.get_output_embeddings()
    try:
        decoder_output = _decoder_output(model, decoder, batch, _attention_inputs(causal_lm, batch))
    except attention.Unsupported as e:  # raised by the first attention call that meets it
        log.warning("%s: the log-prob engine uses the dense attention mask for this model", e)
        set_attention(causal_lm, "dense")
        decoder_output = _decoder_output(model, decoder, batch, _attention_inputs(causal_lm, batch))
    hidden = decoder_output.flatten(0, 1)[batch["score_src"]]
    tok = token_logps(hidden, lm_head, batch["score_tgt"], chunk, sq_mass=sq_mass)
    sq = None
    if sq_mass:
        tok, sq = tok
    out = _per_sequence_sums(batch, tok, sq)
    if tokens:
        out["token_logps"] = tok
    return out


def padded_tokens(values: torch.Tensor, score_seq: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token `values` of a batch (flat, one per scored token, as `token_logps`) laid out as
    [n, T] with T the longest sequence, and the [n, T] mask of real tokens (differentiable in
    `values`; padding 0)."""
    lengths = torch.bincount(score_seq, minlength=n)
    width = max(int(lengths.max()), 1) if n else 1
    starts = torch.cumsum(lengths, 0) - lengths
    position = torch.arange(score_seq.shape[0], device=score_seq.device) - starts[score_seq]
    out = values.new_zeros(n, width).index_put((score_seq, position), values)
    mask = torch.zeros(n, width, dtype=torch.bool, device=values.device)
    mask[score_seq, position] = True
    return out, mask


def _attention_inputs(causal_lm, batch: dict) -> dict:
    """The forward's attention arguments for the batch. Segments: the row layout for segment
    attention, and an all-true 2D mask, so that transformers builds no mask (with none it would
    read the restarting positions as packed sequences and build a dense one). Dense: the 4D mask."""
    doc_ids, branch_ids = batch["doc_ids"], batch["branch_ids"]
    if attention_path(causal_lm, doc_ids.shape[1]) == "segments":
        attention.use_segments(causal_lm)
        return {
            "attention_mask": torch.ones(doc_ids.shape, dtype=torch.bool, device=doc_ids.device),
            attention.KWARG: attention.layout(doc_ids, branch_ids),
        }
    boolean = causal_lm.config._attn_implementation in ("sdpa", attention.NAME)
    dtype = next(causal_lm.parameters()).dtype
    return {"attention_mask": attention_mask(doc_ids, branch_ids, boolean, dtype)}


def _decoder_output(model, decoder, batch: dict, attention_inputs: dict) -> torch.Tensor:
    """The decoder's final hidden states [R, T, H] from one forward of `model` through its own
    forward (with `logits_to_keep=1`), captured by a hook on `decoder`."""
    captured = {}
    handle = decoder.register_forward_hook(_capture_hook(captured))
    segments = attention.KWARG in attention_inputs
    try:
        with attention.expecting_layout() if segments else contextlib.nullcontext():
            model(
                input_ids=batch["input_ids"],
                position_ids=batch["position_ids"],
                logits_to_keep=1,
                use_cache=False,
                **attention_inputs,
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
