"""Reference log-probs computed once before training and cached on disk.

Before the first step the policy *is* the reference (a fresh LoRA adapter is zero; a full
fine-tune starts from the reference weights), so one pass of the policy, adapter disabled, gives
every reference log-prob and training holds one model and runs one forward per batch. The cache
key covers the reference weights, every token id, the layout and the precision, so a changed
model, data set or tokenizer never reuses a stale file.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from .logprobs import sequence_logps

log = logging.getLogger("prefopt")


def weights_fingerprint(model) -> str:
    """Hash of the reference weights: every parameter and buffer except LoRA adapter tensors."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        name = name.replace("base_model.model.", "").replace(".base_layer", "")
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
                 if t.numel() else b"")
    return h.hexdigest()


def data_fingerprint(examples: list[dict], extra: str = "") -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(extra.encode())
    for ex in examples:
        for key in ("prompt_ids", "chosen_ids", "rejected_ids", "completion_ids", "kl_completion_ids"):
            if key in ex:
                h.update(key.encode())
                h.update(torch.tensor(ex[key], dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def _disabled_adapter(model):
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


@torch.no_grad()
def compute(model, examples: list[dict], collator, *, batch_size: int = 8, chunk: int = 1024,
            autocast_dtype: Optional[torch.dtype] = None, progress: bool = True,
            desc: str = "reference log-probs") -> torch.Tensor:
    """[len(examples), K] summed log-probs of every response under `model` with any adapter off."""
    return compute_all(model, examples, collator, batch_size=batch_size, chunk=chunk,
                       autocast_dtype=autocast_dtype, progress=progress, desc=desc)["ref_logps"]


@torch.no_grad()
def compute_all(model, examples: list[dict], collator, *, batch_size: int = 8, chunk: int = 1024,
                autocast_dtype: Optional[torch.dtype] = None, progress: bool = True,
                desc: str = "reference log-probs", shard: tuple[int, int] = (0, 1)) -> dict:
    """{"ref_logps": [len(examples), K]} summed log-probs of every response under `model` with any
    adapter off; with a collator built with `ld_prefix=True` also "ref_prefix_logps" (the sums over
    each response's first min(len_c, len_r) tokens, for LD-DPO)."""
    keys = {"ref_logps": "logps"}
    if getattr(collator, "ld_prefix", False):
        keys["ref_prefix_logps"] = "prefix_logps"
    return per_response(model, examples, collator, keys, adapter_off=True, batch_size=batch_size, chunk=chunk,
                        autocast_dtype=autocast_dtype, progress=progress, desc=desc, shard=shard)


@torch.no_grad()
def per_response(model, examples: list[dict], collator, keys: dict, *, adapter_off: bool, batch_size: int = 8,
                 chunk: int = 1024, autocast_dtype: Optional[torch.dtype] = None, progress: bool = True,
                 desc: str = "log-probs", shard: tuple[int, int] = (0, 1)) -> dict:
    """{name: [len(examples), K] float64} of every response of `examples`, where `keys` maps each
    name to an output of sequence_logps ("logps", "lengths", "prefix_logps"); in eval mode,
    examples batched in order of length, any adapter off when `adapter_off`.

    shard = (rank, world) with world > 1 (torch.distributed initialised): this process computes
    every world-th batch, and one all-reduce of the (otherwise zero) results gives every process
    every value. The batches are the same as in one process, so are the values, bit for bit."""
    from tqdm.auto import tqdm

    from ..data.collate import responses_of, row_length

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: row_length(examples[i], collator.prefix_sharing))
    K = len(responses_of(examples[0]))
    out = {k: torch.zeros(len(examples), K, dtype=torch.float64) for k in keys}
    rank, world = shard
    starts = list(range(0, len(order), batch_size))[rank::world]
    bar = tqdm(total=sum(len(order[s:s + batch_size]) for s in starts), desc=desc, unit="ex",
               disable=not progress)
    try:
        with _disabled_adapter(model) if adapter_off else contextlib.nullcontext():
            for s in starts:
                idx = order[s:s + batch_size]
                batch = {k: v.to(device) for k, v in collator([examples[i] for i in idx]).items()}
                with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                    enabled=autocast_dtype is not None):
                    res = sequence_logps(model, batch, chunk)
                for k, src in keys.items():
                    out[k][idx] = res[src].double().cpu().view(len(idx), K)
                bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    if world > 1:
        import torch.distributed as dist

        for k in out:
            total = out[k].to(device)
            dist.all_reduce(total)  # each value comes from exactly one process; the others add 0.0
            out[k] = total.cpu()
    return out


def precompute(model, examples: list[dict], collator, *, cache_dir: Optional[Path], batch_size: int,
               chunk: int, autocast_dtype: Optional[torch.dtype], progress: bool = True,
               shard: tuple[int, int] = (0, 1), write_cache: bool = True) -> None:
    """Attach `ref_logps` (a list of K floats) to every example, from the disk cache when valid;
    with a collator built with `ld_prefix=True` (LD-DPO) also `ref_prefix_logps`.

    Under DDP every process calls this with shard = (rank, world): when every process finds the
    cache, all read it; otherwise each computes its share of the batches (see per_response) and
    those with `write_cache` (one per machine) write the file."""
    if not examples:
        return
    ld = getattr(collator, "ld_prefix", False)
    names = ("ref_logps", "ref_prefix_logps") if ld else ("ref_logps",)
    path = None
    if cache_dir is not None:
        key = data_fingerprint(
            examples, f"{weights_fingerprint(model)}|{collator.prefix_sharing}|{autocast_dtype}|{chunk}"
            + ("|ld_prefix" if ld else "")  # unchanged key (and cache files) when LD-DPO is off
        )
        path = Path(cache_dir) / f"{key}.safetensors"
    values = None
    if path is not None and path.is_file():
        from safetensors.torch import load_file

        values = load_file(str(path))
        if any(k not in values or values[k].shape[0] != len(examples) for k in names):
            values = None
    _, world = shard
    if world > 1:  # all processes read the cache, or all compute: never some of each (a hang)
        import torch.distributed as dist

        found = torch.tensor([float(values is not None)], device=next(model.parameters()).device)
        dist.all_reduce(found, op=dist.ReduceOp.MIN)
        if not found.item():
            values = None
    if values is not None:
        log.info("reference log-probs: reusing %s", path)
    else:
        values = compute_all(model, examples, collator, batch_size=batch_size, chunk=chunk,
                             autocast_dtype=autocast_dtype, progress=progress, shard=shard)
        if path is not None and write_cache:
            from safetensors.torch import save_file

            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")  # processes sharing the cache never collide
            save_file({k: values[k].contiguous() for k in names}, str(tmp))
            tmp.replace(path)
    for k in names:
        for ex, v in zip(examples, values[k].tolist()):
            ex[k] = v
