"""Sampling from a policy or its reference, and log-probs / KL of sampled responses.

Sampling is true temperature-1 ancestral sampling (top_k = 0, top_p = 1): anything else biases
the KL(π‖π_ref) estimate, which is the mean over samples y ~ π of Σ_t log π(y_t|…) − log π_ref(y_t|…).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .data.collate import Collator
from .modeling.logprobs import sequence_logps


def adapter_disabled(model, disabled: bool = True):
    """Context: the reference (adapter off) when `disabled` and the model is a peft model."""
    if disabled and hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    return contextlib.nullcontext()


@torch.no_grad()
def sample(model, tokenizer, prompt_ids: list[list[int]], n: int, *, max_new_tokens: int, seed: int,
           batch_size: int = 128, reference: bool = False, progress: bool = True,
           desc: str = "sampling") -> list[list[list[int]]]:
    """`n` responses per prompt (token ids, cut after the first EOS); reference=True: adapter off."""
    from tqdm.auto import tqdm

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
                chunk = prompt_ids[s:s + per_batch]
                width = max(len(p) for p in chunk)
                ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
                gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                                     top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, num_return_sequences=n,
                                     pad_token_id=pad, eos_token_id=eos, use_cache=True)
                gen = gen[:, width:].tolist()
                for i in range(len(chunk)):
                    responses = []
                    for row in gen[i * n:(i + 1) * n]:
                        if eos in row:
                            row = row[: row.index(eos) + 1]
                        responses.append(row)
                    out.append(responses)
                bar.update(len(chunk) * n)
    finally:
        bar.close()
        model.train(was_training)
    return out


@torch.no_grad()
def response_logps(model, pad_token_id: int, prompt_ids: list[list[int]], responses: list[list[int]], *,
                   reference: bool = False, batch_size: int = 32, chunk: int = 1024,
                   autocast_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Summed log-prob of each responses[i] after prompt_ids[i] (float64 tensor)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    collate = Collator(pad_token_id, prefix_sharing=True)
    out = []
    try:
        with adapter_disabled(model, reference):
            for s in range(0, len(responses), batch_size):
                exs = [{"prompt_ids": p, "completion_ids": r}
                       for p, r in zip(prompt_ids[s:s + batch_size], responses[s:s + batch_size])]
                batch = {k: v.to(device) for k, v in collate(exs).items()}
                with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                    enabled=autocast_dtype is not None):
                    out.append(sequence_logps(model, batch, chunk)["logps"].double().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)
