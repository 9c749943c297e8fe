"""Sampling from a policy or its reference, and log-probs / KL of sampled responses.

Sampling is true temperature-1 ancestral sampling (top_k = 0, top_p = 1): anything else biases
the KL(π‖π_ref) estimate, which is the mean over samples y ~ π of Σ_t log π(y_t|…) − log π_ref(y_t|…).
"""

from __future__ import annotations

from typing import Optional

import torch
from tqdm.auto import tqdm

from prefopt.data.collate import Collator
from prefopt.modeling.logprobs import adapter_disabled, collated_logps


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    n: int,
    *,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 128,
    reference: bool = False,
    progress: bool = True,
    desc: str = "sampling",
) -> list[list[list[int]]]:
    """`n` responses per prompt (token ids, cut after the first EOS); reference=True: adapter off."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    per_batch = max(1, batch_size // n)
    out: list[list[list[int]]] = []
    torch.manual_seed(seed)
    bar = tqdm(total=len(prompt_ids) * n, desc=desc, unit="sample", disable=not progress)
    try:
        with adapter_disabled(model, reference):
            for s in range(0, len(prompt_ids), per_batch):
                chunk = prompt_ids[s : s + per_batch]
                out += _sample_chunk(model, chunk, n, device, pad, eos, max_new_tokens)
                bar.update(len(chunk) * n)
    finally:
        bar.close()
        model.train(was_training)
    return out


def _sample_chunk(model, chunk: list[list[int]], n: int, device, pad: int, eos: int, max_new_tokens: int) -> list:
    """`n` responses for each prompt of `chunk`, generated together from left-padded prompts."""
    width = max(len(p) for p in chunk)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
    gen = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        num_return_sequences=n,
        pad_token_id=pad,
        eos_token_id=eos,
        use_cache=True,
    )
    gen = gen[:, width:].tolist()
    return [_cut_after_eos(gen[i * n : (i + 1) * n], eos) for i in range(len(chunk))]


def _cut_after_eos(rows: list[list[int]], eos: int) -> list[list[int]]:
    """Each row up to and including its first EOS (the whole row when it has none)."""
    responses = []
    for row in rows:
        if eos in row:
            row = row[: row.index(eos) + 1]
        responses.append(row)
    return responses


@torch.no_grad()
def response_logps(
    model,
    pad_token_id: int,
    prompt_ids: list[list[int]],
    responses: list[list[int]],
    *,
    reference: bool = False,
    batch_size: int = 32,
    chunk: int = 1024,
    autocast_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Summed log-prob of each responses[i] after prompt_ids[i] (float64 tensor)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    collate = Collator(pad_token_id, prefix_sharing=True)
    out = []
    try:
        with adapter_disabled(model, reference):
            for s in range(0, len(responses), batch_size):
                exs = [
                    {"prompt_ids": p, "completion_ids": r}
                    for p, r in zip(prompt_ids[s : s + batch_size], responses[s : s + batch_size])
                ]
                out.append(collated_logps(model, collate, exs, device, chunk, autocast_dtype)["logps"].double().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)
