"""Segment attention: the log-prob engine's attention as plain causal calls, with no T×T mask.

A collated row holds, per example, [prompt | response 1 | … | response K] (data/collate.py). Token i
may see token j when j ≤ i, both belong to the same example, and j is in the prompt or in i's own
response. The dense path (`logprobs.attention_mask`) writes that rule into an [R, 1, T, T] mask:
it grows as T², its kernel computes every block of it, and on a GPU a mask keeps SDPA off its
flash kernels. Here the rule is kept by what each call sees instead: for response k of an example,
one `scaled_dot_product_attention(is_causal=True)` over [prompt ; response k] — square, so the
top-left causal alignment is the right one — gives response k's outputs; the first response's
call also gives the prompt's (an example without a response gets a prompt-only call; a separate
prompt call would only add work). Every call is unmasked and causal: CPU SDPA serves it with its
flash kernel, GPU SDPA/flash kernels support it, and grouped key/value heads go in as they are
(`enable_gqa`). A call's work is (P + R_k)²/2; the prompt's queries are recomputed in each later
response's call (P²/2 per extra response).

The calls are gathered, not looped: calls of similar length form a group (GROUP_SLACK), whose
tokens are copied into one [N, L, H, D] batch (right-padded, the padding after every real slot, so
no real query sees it), one SDPA call per group, and the outputs are gathered back into [B, T, H, D]
(zeros at padding, which is never scored). Everything but the kernels' own blocks is linear in the
tokens. A batch whose rows are each one [prompt | response] (no prefix sharing, or one response
per example) needs no gathering: one causal call over the batch as it is.

The function is registered with transformers' AttentionInterface as `NAME`; `use_segments` switches
a loaded sdpa model to it (the mask interface gets sdpa's mask function under that name, so any
other forward — generation, a plain `model(ids)` — is exactly sdpa's). The engine passes the row
layout (`layout`, computed once per forward from the batch's doc and branch ids) as the keyword
argument `KWARG` of the model's forward; transformers hands it to every attention call, and it is
kept in the arguments activation checkpointing replays, so recomputed layers see it too. Without it
the function is transformers' sdpa.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "prefopt_segments"  # the attention implementation's name in transformers' registries
KWARG = "prefopt_segments"  # the model forward's keyword argument that carries the Layout

# Set while the engine runs a forward with a Layout: an attention call that then gets none means the
# model does not hand its forward's keyword arguments to its attention (a remote-code model, say).
_EXPECTING = contextvars.ContextVar("prefopt_segments_expected", default=False)


@dataclass(frozen=True)
class Example:
    """One example's place in its row: the prompt's (start, length) and each response's."""

    prompt: tuple[int, int]
    responses: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Group:
    """Causal calls of similar length run as one batched SDPA call: for each call n and slot l,
    the flat index (row · T + position) of the token it holds, [N, L]. A call shorter than L is
    right-padded with its own first token: the padding comes after every real slot, so under
    top-left causal attention no real query sees it."""

    tokens: torch.Tensor


@dataclass(frozen=True)
class Layout:
    """A batch's layout for segment attention. `rows`: each row's examples, in position order.
    `simple`: every row is at most one example [prompt | response] from position 0, then padding,
    so one causal call over the batch as it is is exact for every real token (padding sees what
    precedes it: finite, never scored). Otherwise `groups` are the calls, and `output` [R, T] gives
    each token's slot in the groups' outputs flattened and concatenated (a zero slot last, for
    padding)."""

    rows: tuple[tuple[Example, ...], ...]
    width: int
    simple: bool
    groups: tuple[Group, ...] = ()
    output: Optional[torch.Tensor] = None


# Calls are sorted by length and batched greedily while padding them to the longest adds at most
# this fraction to the group's attention work (Σ L² over its calls): fewer kernel calls, little waste.
GROUP_SLACK = 1.25


def layout(doc_ids: torch.Tensor, branch_ids: torch.Tensor) -> Layout:
    """The Layout of a batch from its doc ids (example per token, −1 padding) and branch ids (0
    prompt, k response k), with its index tensors on their device. Each example's tokens must be
    contiguous runs: the prompt first, then each response once. ValueError for any other layout
    (the dense mask takes any)."""
    doc, branch = doc_ids.detach().cpu(), branch_ids.detach().cpu()
    R, T = doc.shape
    change = torch.ones(R, T, dtype=torch.bool)
    change[:, 1:] = (doc[:, 1:] != doc[:, :-1]) | (branch[:, 1:] != branch[:, :-1])
    rows = []
    for r in range(R):
        starts = change[r].nonzero().flatten().tolist()
        runs = zip(starts, starts[1:] + [T], doc[r, starts].tolist(), branch[r, starts].tolist())
        rows.append(_row_examples(r, runs))
    rows = tuple(rows)
    if all(_is_simple(examples) for examples in rows):
        return Layout(rows, T, True)
    groups, output = _calls(rows, T)
    device = doc_ids.device
    return Layout(rows, T, False, tuple(Group(g.to(device)) for g in groups), output.to(device))


def _row_examples(r: int, runs) -> tuple[Example, ...]:
    """The examples of row `r` from its runs (start, end, doc, branch) of equal doc and branch ids."""
    examples: list[Example] = []
    current, seen = None, set()
    for start, end, d, b in runs:
        if d < 0:
            continue  # padding
        if d != current:
            if d in seen:
                raise ValueError(f"segment attention: row {r} holds example {d} in pieces")
            seen.add(d)
            current = d
            examples.append(Example((start, end - start) if b == 0 else (start, 0), ()))
            if b == 0:
                continue
        elif b == 0:
            raise ValueError(f"segment attention: row {r}, example {d}: its prompt is not one run before its responses")
        last = examples[-1]
        examples[-1] = Example(last.prompt, last.responses + ((start, end - start),))
    return tuple(examples)


def _is_simple(examples: tuple[Example, ...]) -> bool:
    if not examples:
        return True
    if len(examples) > 1:
        return False
    (p0, pn), responses = examples[0].prompt, examples[0].responses
    return p0 == 0 and (not responses or (len(responses) == 1 and responses[0][0] == pn))


def _calls(rows: tuple[tuple[Example, ...], ...], T: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The causal calls of `rows`, batched into groups ([N, L] flat token indices each), and the
    [R, T] output index (module docstring, `Layout`)."""
    calls = []  # (its tokens, the slots whose outputs are kept, the tokens they are for): flat indices
    for r, examples in enumerate(rows):
        for ex in examples:
            p0, pn = ex.prompt
            prompt = torch.arange(p0, p0 + pn)
            if not ex.responses:
                calls.append((r * T + prompt, torch.arange(pn), r * T + prompt))
            for k, (s, n) in enumerate(ex.responses):
                response = torch.arange(s, s + n)
                slots = torch.arange(pn + n) if k == 0 else torch.arange(pn, pn + n)
                given = torch.cat([prompt, response]) if k == 0 else response
                calls.append((r * T + torch.cat([prompt, response]), slots, r * T + given))
    calls.sort(key=lambda c: -len(c[0]))
    groups, output, offset = [], torch.full((len(rows) * T,), -1), 0
    for group in _grouped(calls):
        L = len(group[0][0])
        tokens = torch.stack([torch.cat([t, t[:1].expand(L - len(t))]) for t, _, _ in group])
        for n, (_, slots, given) in enumerate(group):
            output[given] = offset + n * L + slots
        groups.append(tokens)
        offset += len(group) * L
    output[output < 0] = offset  # padding: the zero slot after every group's outputs
    return groups, output.view(len(rows), T)


def _grouped(calls: list) -> list[list]:
    """`calls` (sorted longest first) cut into runs whose padded work stays within GROUP_SLACK."""
    groups, work = [], 0
    for call in calls:
        n = len(call[0])
        if groups:
            group = groups[-1]
            longest = len(group[0][0])
            if (len(group) + 1) * longest**2 <= GROUP_SLACK * (work + n * n):
                group.append(call)
                work += n * n
                continue
        groups.append([call])
        work = n * n
    return groups


def segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [B, Hq, T, D], key/value [B, Hkv, T, D]
    (positions already applied) -> (output [B, T, Hq, D], None). With the `KWARG` Layout, each
    example's attention as causal SDPA calls (module docstring); without it, transformers' sdpa."""
    segments: Optional[Layout] = kwargs.pop(KWARG, None)
    if segments is None:
        if _EXPECTING.get():
            raise Unsupported("segment attention: the model does not pass its forward's arguments to its attention")
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    _check_supported(module, attention_mask, kwargs)
    gqa = query.shape[1] != key.shape[1]

    def causal(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa)

    if segments.simple:
        return causal(query, key, value).transpose(1, 2).contiguous(), None
    B, H, T, D = query.shape
    # [B, T, H, D] is how the projections lay the tokens out: flat token rows without a copy
    flat = [t.transpose(1, 2).reshape(B * T, t.shape[1], D) for t in (query, key, value)]
    outputs = []
    for group in segments.groups:
        N, L = group.tokens.shape
        q, k, v = (t.index_select(0, group.tokens.flatten()).view(N, L, -1, D).transpose(1, 2) for t in flat)
        outputs.append(causal(q, k, v).transpose(1, 2).reshape(N * L, H, D))
    outputs.append(query.new_zeros(1, H, D))
    return torch.cat(outputs).index_select(0, segments.output.flatten()).view(B, T, H, D), None


class Unsupported(ValueError):
    """The model asks for attention that plain causal calls cannot give (the engine then takes the
    dense path for it)."""


def _check_supported(module, attention_mask, kwargs: dict) -> None:
    """Unsupported where the model asks for attention that plain causal calls cannot give."""
    problems = []
    if attention_mask is not None:
        problems.append("the model built an attention mask of its own (sliding window or another pattern)")
    for name in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            problems.append(f"the model's attention uses {name}")
    if not kwargs.get("is_causal", getattr(module, "is_causal", True)):
        problems.append("the model's attention is not causal")
    if problems:
        raise Unsupported(f"segment attention cannot compute this model's attention ({'; '.join(problems)})")


@contextlib.contextmanager
def expecting_layout():
    """Context: attention calls must carry the Layout (Unsupported otherwise); for the engine's
    forward, not for the backward's recomputation, which replays the forward's arguments."""
    token = _EXPECTING.set(True)
    try:
        yield
    finally:
        _EXPECTING.reset(token)


def register() -> None:
    """Register `segment_attention` as `NAME` with transformers (idempotent), with sdpa's mask
    function, so that forwards without a Layout are sdpa's in every respect."""
    AttentionInterface.register(NAME, segment_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_segments(causal_lm) -> None:
    """Switch a transformers causal LM whose attention is sdpa to `NAME` (already switched: no-op).
    It stays switched; forwards without the Layout are unchanged (sdpa)."""
    current = causal_lm.config._attn_implementation
    if current == NAME:
        return
    if current != "sdpa":
        raise Unsupported(f"segment attention replaces sdpa; this model's attention is {current!r}")
    register()
    causal_lm.set_attn_implementation(NAME)
    if causal_lm.config._attn_implementation != NAME:
        raise Unsupported(f"segment attention: {type(causal_lm).__name__} does not let its attention be set")
