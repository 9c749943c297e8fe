"""Reference log-probs: computed once before training and cached on disk, or on the fly from a
frozen copy or from the policy with its adapter off.

Before the first step the policy *is* the reference (a fresh LoRA adapter is zero; a full
fine-tune starts from the reference weights), so one pass of the policy, adapter disabled, gives
every reference log-prob and training holds one model and runs one forward per batch. The cache
key covers the reference weights, every token id, the layout and the precision, so a changed
model, data set or tokenizer never reuses a stale file.

A loss whose reference moves during training (TR-DPO) cannot precompute: its reference is a frozen
copy of the policy (`frozen_copy`) that `MovingReference.update` softly moves towards the policy.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from peft.utils import ModulesToSaveWrapper
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from prefopt import losses
from prefopt.data.collate import responses_of, row_length
from prefopt.errors import PrefoptError
from prefopt.modeling import load
from prefopt.modeling.logprobs import (
    SEGMENTS_FROM,
    adapter_disabled,
    attention_setting,
    collated_logps,
    sequence_logps,
)

log = logging.getLogger("prefopt")

# The temporary files of _write_cache (KEY.PID.tmp) and of check_cache_dir's write test.
TEMP_NAME = re.compile(r"^(?:[0-9a-f]{32}|\.write-test)\.(\d+)\.tmp$")
CHECKSUM_KEY = "prefopt_checksum"  # safetensors metadata of a cache file: a hash of its tensors
# What reading a damaged cache file can raise (safetensors, torch, the file system).
CACHE_ERRORS = (SafetensorError, OSError, ValueError, RuntimeError, MemoryError, KeyError, TypeError)


def weights_fingerprint(model) -> str:
    """Hash of the reference weights: every parameter and buffer except LoRA adapter tensors."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        name = name.replace("base_model.model.", "").replace(".base_layer", "")
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def data_fingerprint(examples: list[dict], extra: str = "") -> str:
    """Hash of `extra` and every token id of `examples` (prompt and responses)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(extra.encode())
    for ex in examples:
        for key in ("prompt_ids", "chosen_ids", "rejected_ids", "completion_ids", "kl_completion_ids"):
            if key in ex:
                h.update(key.encode())
                h.update(torch.tensor(ex[key], dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def compute_all(
    model,
    examples: list[dict],
    collator,
    *,
    batch_size: int = 8,
    chunk: int = 1024,
    autocast_dtype: Optional[torch.dtype] = None,
    progress: bool = True,
    desc: str = "reference log-probs",
    shard: tuple[int, int] = (0, 1),
) -> dict:
    """{"ref_logps": [len(examples), K]} summed log-probs of every response under `model` with any
    adapter off; with a collator built with a token subset also "ref_subset_logps" (the sums over
    each response's subset: LD-DPO's prefix, SamPO's sample)."""
    keys = {"ref_logps": "logps", "ref_subset_logps": "subset_logps"}
    keys = {name: keys[name] for name in _cached_names(collator)}
    return per_response(
        model,
        examples,
        collator,
        keys,
        adapter_off=True,
        batch_size=batch_size,
        chunk=chunk,
        autocast_dtype=autocast_dtype,
        progress=progress,
        desc=desc,
        shard=shard,
    )


@torch.no_grad()
def per_response(
    model,
    examples: list[dict],
    collator,
    keys: dict,
    *,
    adapter_off: bool,
    batch_size: int = 8,
    chunk: int = 1024,
    autocast_dtype: Optional[torch.dtype] = None,
    progress: bool = True,
    desc: str = "log-probs",
    shard: tuple[int, int] = (0, 1),
) -> dict:
    """{name: [len(examples), K] float64} of every response of `examples`, where `keys` maps each
    name to an output of sequence_logps ("logps", "lengths", "subset_logps"); in eval mode,
    examples batched in order of length, any adapter off when `adapter_off`.

    shard = (rank, world) with world > 1 (torch.distributed initialised): this process computes
    every world-th batch, and one all-reduce of the (otherwise zero) results gives every process
    every value. The batches are the same as in one process, so are the values, bit for bit."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: row_length(examples[i], collator.prefix_sharing))
    K = len(responses_of(examples[0]))
    out = {k: torch.zeros(len(examples), K, dtype=torch.float64) for k in keys}
    rank, world = shard
    starts = list(range(0, len(order), batch_size))[rank::world]
    bar = tqdm(total=sum(len(order[s : s + batch_size]) for s in starts), desc=desc, unit="ex", disable=not progress)
    try:
        with adapter_disabled(model, adapter_off):
            for s in starts:
                idx = order[s : s + batch_size]
                res = collated_logps(model, collator, [examples[i] for i in idx], device, chunk, autocast_dtype)
                for k, src in keys.items():
                    out[k][idx] = res[src].double().cpu().view(len(idx), K)
                bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    if world > 1:
        _sum_across_processes(out, device)
    return out


def _sum_across_processes(out: dict, device: torch.device) -> None:
    """Replace every tensor of `out` by its sum over the processes, via `device`."""
    for k in out:
        total = out[k].to(device)
        dist.all_reduce(total)  # each value comes from exactly one process; the others add 0.0
        out[k] = total.cpu()


def precompute(
    model,
    examples: list[dict],
    collator,
    *,
    cache_dir: Optional[Path],
    batch_size: int,
    chunk: int,
    autocast_dtype: Optional[torch.dtype],
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
    write_cache: bool = True,
) -> None:
    """Attach `ref_logps` (a list of K floats) to every example, from the disk cache when valid;
    with a collator built with a token subset (LD-DPO, SamPO) also `ref_subset_logps`.

    Under DDP every process calls this with shard = (rank, world): when every process finds the
    cache, all read it; otherwise each computes its share of the batches (see per_response) and
    those with `write_cache` (one per machine) write the file."""
    if not examples:
        return
    names = _cached_names(collator)
    path = None if cache_dir is None else _cache_path(model, examples, collator, cache_dir, autocast_dtype, chunk)
    if path is not None:
        remove_orphans(path.parent)
    values = _read_cache(path, names, len(examples), len(responses_of(examples[0])))
    _, world = shard
    if world > 1 and not _found_by_all(values is not None, model):
        values = None  # all processes read the cache, or all compute: never some of each (a hang)
    if values is not None:
        log.info("reference log-probs: reusing %s", path)
    else:
        if path is not None:
            check_cache_dir(path.parent)  # every process: all fail alike, before any all-reduce
        values = compute_all(
            model,
            examples,
            collator,
            batch_size=batch_size,
            chunk=chunk,
            autocast_dtype=autocast_dtype,
            progress=progress,
            shard=shard,
        )
        if path is not None and write_cache:
            _write_cache(path, {k: values[k] for k in names})
    _attach(examples, values, names)


def check_cache_dir(folder: Path) -> None:
    """A PrefoptError naming reference.cache_dir unless `folder` is (or can be made) a folder this
    process can write to: created when missing, then a file written into it and removed."""
    if folder.exists() and not folder.is_dir():
        raise PrefoptError(
            f"reference.cache_dir: '{folder}' is a file, not a folder; give a folder for the cached reference "
            "log-probs, or leave the key out (the prefopt cache)."
        )
    probe = folder / f".write-test.{os.getpid()}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PrefoptError(
            f"reference.cache_dir: cannot write into '{folder}' ({e.strerror or e}); give a writable folder, "
            "or leave the key out (the prefopt cache)."
        ) from None


def remove_orphans(folder: Path) -> None:
    """Remove the temporary files (NAME.PID.tmp) that a cache writer killed mid-write left in
    `folder`: those whose process PID is no longer alive."""
    if os.name != "posix" or not folder.is_dir():
        return  # os.kill(pid, 0) is a liveness test on POSIX only
    for tmp in folder.glob("*.tmp"):
        match = TEMP_NAME.match(tmp.name)
        if match and not _alive(int(match.group(1))):
            try:
                tmp.unlink()
                log.info("removed %s, left by an interrupted reference cache write", tmp)
            except OSError:
                pass  # another process removed it, or no permission: harmless either way


def _alive(pid: int) -> bool:
    """Whether process `pid` exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def _cache_path(model, examples: list[dict], collator, cache_dir, autocast_dtype, chunk: int) -> Path:
    """CACHE_DIR/<key>.safetensors, the key covering the reference weights, the token ids, the
    layout, the precision, the token subset (with its seed for SamPO's sample) and the attention
    path unless every batch takes the dense mask (segment attention agrees with it bit for bit in
    float32, but only to rounding in bf16 — autocast or bf16 weights: 0.2-0.3 nats on 1,000-nat
    sums, measured); the dense path's key is that of earlier versions."""
    setting = attention_setting(model)
    if setting == "auto" and collator.width(examples) < SEGMENTS_FROM:
        setting = "dense"  # no batch of these examples reaches segment attention: the dense path's key
    attention = "" if setting == "dense" else f"|attention={setting}"
    key = data_fingerprint(
        examples,
        f"{weights_fingerprint(model)}|{collator.prefix_sharing}|{autocast_dtype}|{chunk}"
        + _subset_key(collator)
        + attention,
    )
    return Path(cache_dir) / f"{key}.safetensors"


def _subset_key(collator) -> str:
    """The cache key's part for the collator's token subset: "" without one (the key, and the cache
    files, of a run without a subset are those of earlier versions), the mode (and the seed that
    draws SamPO's sample) with one."""
    subset = getattr(collator, "subset", None)
    if subset is None:
        return ""
    return f"|subset={subset}" + (f"|seed={collator.seed}" if subset == "sample" else "")


def _cached_names(collator) -> tuple:
    """The per-example values precomputed for `collator`'s batches: ref_logps, and ref_subset_logps
    when it flags a token subset."""
    return ("ref_logps", "ref_subset_logps") if getattr(collator, "subset", None) else ("ref_logps",)


def _read_cache(path: Optional[Path], names: tuple, n: int, k: int) -> Optional[dict]:
    """The cached tensors at `path`; None when there is no file. A file that cannot be read, fails
    its checksum or lacks one of `names` as [n, k] is said in a warning and taken as absent (its
    values are recomputed and the file rewritten)."""
    if path is None or not path.is_file():
        return None
    try:
        problem = load.safetensors_problem(path)
        if problem is None:
            values, metadata = _load(path)
            problem = _cache_problem(values, metadata, names, (n, k))
    except CACHE_ERRORS as e:
        problem = f"{type(e).__name__}: {load.detail(e)}"
    if problem is not None:
        log.warning("reference cache %s is unreadable (%s); recomputing", path, problem)
        return None
    return values


def _load(path: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of the safetensors file at `path`, the tensors copied out of the file."""
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name).clone() for name in f.keys()}, f.metadata() or {}


def _cache_problem(values: dict, metadata: dict, names: tuple, shape: tuple) -> Optional[str]:
    """What is wrong with cached `values`, or None: a missing name, a wrong shape or dtype, a checksum
    that does not match (files of older versions have none)."""
    for name in names:
        if name not in values:
            return f"no tensor '{name}'"
        if tuple(values[name].shape) != shape or values[name].dtype != torch.float64:
            return f"'{name}' is {values[name].dtype} {list(values[name].shape)}, expected float64 {list(shape)}"
    if CHECKSUM_KEY in metadata and metadata[CHECKSUM_KEY] != _checksum(values):
        return "checksum mismatch"
    return None


def _checksum(tensors: dict) -> str:
    """A hash of the names and bytes of `tensors`."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _found_by_all(found: bool, model) -> bool:
    """Whether every process found the cache (an all-reduce on the model's device)."""
    flag = torch.tensor([float(found)], device=next(model.parameters()).device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _write_cache(path: Path, tensors: dict) -> None:
    """Write `tensors` (with their checksum) to `path` through a temporary file, so readers never
    see a partial one. A failure is a warning: the values are in memory, only the cache is lost."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # processes sharing the cache never collide
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata={CHECKSUM_KEY: _checksum(tensors)})
        tmp.replace(path)
    except (OSError, SafetensorError) as e:
        log.warning("could not write the reference cache %s (%s); the values are not cached", path, load.detail(e))
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _attach(examples: list[dict], values: dict, names: tuple) -> None:
    """Store row i of each values[name] in examples[i][name], as a list of floats."""
    for k in names:
        for ex, v in zip(examples, values[k].tolist()):
            ex[k] = v


def precompute_for_training(
    model, example_lists: list, collator, args, *, cache_dir: Optional[Path], chunk: int, progress: bool
) -> None:
    """`precompute` on each list of `example_lists` the way a training run with TrainingArguments
    `args` does it: on its device, batches of twice the training batch, bf16 autocast when the run
    uses it, progress on the first process only; under DDP each process computes its share and the
    first process of each machine writes the cache."""
    if torch.cuda.is_available():
        model.to(args.device)
    for examples in example_lists:
        precompute(
            model,
            examples,
            collator,
            cache_dir=cache_dir,
            batch_size=2 * args.per_device_train_batch_size,
            chunk=chunk,
            autocast_dtype=torch.bfloat16 if args.bf16 else None,
            progress=progress and args.process_index == 0,
            shard=(args.process_index, args.world_size),
            write_cache=args.local_process_index == 0,
        )


def for_training(
    model,
    spec,
    cfg,
    path: str,
    example_lists: list[list[dict]],
    collator,
    args,
    progress: bool,
    from_policy: bool = False,
):
    """The reference a training run needs, set up before the first step: a loss whose reference
    moves (TR-DPO) gets None (the trainer copies the policy itself, see MovingReference); with
    reference.precompute every example of `example_lists` gets its reference log-probs (from the
    cache when valid; under DDP each process computes its share) and None is returned; without it
    a full fine-tune gets a frozen copy of the model at `path` (returned; with `from_policy`, a copy
    of the untrained policy itself) and a LoRA run uses the policy with its adapter off (None).
    Reference-free losses get None."""
    if not spec.needs_reference or spec.moving_reference:
        return None
    if cfg.reference.precompute:
        cache = Path(cfg.reference.cache_dir) if cfg.reference.cache_dir else load.cache_dir() / "reference"
        precompute_for_training(
            model, example_lists, collator, args, cache_dir=cache, chunk=cfg.train.lm_head_chunk, progress=progress
        )
        return None
    if cfg.lora.enabled or hasattr(model, "disable_adapter"):
        return None
    if from_policy:
        return frozen_copy(model)
    ref_model = load.load_configured(path, cfg.model)
    return ref_model.requires_grad_(False).eval()


def outputs(
    model, batch: dict, ref_model=None, chunk: int = 1024, precomputed: bool = True, tokens: bool = False
) -> dict:
    """{"logps"} of the reference for a training batch (and "subset_logps" when the batch flags a
    token subset): precomputed values carried by the batch (unless `precomputed` is false), a
    frozen copy, or the policy with its adapter off. With `tokens` (not precomputed), also the
    per-token `token_logps` (sequence_logps' tokens=True)."""
    if precomputed and "ref_logps" in batch:
        out = {"logps": batch["ref_logps"]}
        if "ref_subset_logps" in batch:
            out["subset_logps"] = batch["ref_subset_logps"]
        return out
    with torch.no_grad():
        if ref_model is not None:
            return sequence_logps(ref_model, batch, chunk, tokens=tokens)
        base = model.module if hasattr(model, "module") and not hasattr(model, "disable_adapter") else model
        if not hasattr(base, "disable_adapter"):
            raise RuntimeError("no reference: give ref_model, precomputed ref_logps, or a peft model")
        with base.disable_adapter():
            return sequence_logps(model, batch, chunk, tokens=tokens)


# --------------------------------------------------------------------------------------------
# a moving reference (TR-DPO)
# --------------------------------------------------------------------------------------------

PEFT_PREFIX = "base_model.model."  # a peft model's module names: this + the base model's


def frozen_copy(policy):
    """A frozen copy of `policy`'s weights as they are now, in eval mode: a deep copy of the model,
    or of a peft model's base model without its adapters (deep-copied, then unloaded)."""
    copied = copy.deepcopy(_without_wrappers(policy))
    _drop_checkpointed_forwards(copied)
    if hasattr(copied, "disable_adapter"):
        copied = copied.unload()
    return copied.requires_grad_(False).eval()


def _drop_checkpointed_forwards(model) -> None:
    """Give back their class's forward to the modules of a deep copy that modeling.checkpointing
    wrapped: the wrapper a copy inherits still calls the original module's forward (the policy's
    weights), and a frozen copy is never trained, so it needs no checkpointing."""
    for module in model.modules():
        if module.__dict__.pop("_prefopt_checkpointed", False):
            module.__dict__.pop("forward", None)


def _without_wrappers(model):
    """`model` without DDP / accelerate wrappers: the transformers model, or the peft model."""
    while hasattr(model, "module") and not hasattr(model, "disable_adapter") and not hasattr(model, "get_decoder"):
        model = model.module
    return model


class MovingReference:
    """TR-DPO's reference (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good
    Alignment", soft update): `model`, a frozen copy of the policy's starting weights, whose
    weights `update` moves towards the policy's,

        W_ref ← α·W_π + (1 − α)·W_ref          (losses.mix_reference)

    W_π is the policy's effective weight: for a full fine-tune every parameter; for a peft model
    each LoRA-targeted layer's merged weight W0 + ΔW (peft's get_delta_weight) and each
    modules_to_save copy; its other weights are W0, which the reference holds already, so only
    these `names` ever change. Every process holds its own copy and updates it identically (the
    policy's weights are the same on every process after the gradient all-reduce)."""

    def __init__(self, model, policy):
        self.model = model
        self._weights = dict(model.named_parameters())
        self._sources = _policy_weights(policy)
        unknown = sorted(set(self._sources) - set(self._weights))
        if unknown:
            raise ValueError(f"the reference has no weights {', '.join(unknown[:5])}: it is no copy of the policy")

    @property
    def names(self) -> list[str]:
        """The reference's weights that `update` changes (the ones a checkpoint saves)."""
        return list(self._sources)

    @torch.no_grad()
    def update(self, alpha: float) -> None:
        """W_ref ← α·W_π + (1 − α)·W_ref for every weight in `names`."""
        for name, source in self._sources.items():
            weight = self._weights[name]
            weight.copy_(losses.mix_reference(weight, source().to(weight.device, weight.dtype), alpha))

    def state_dict(self) -> dict:
        """{name: the reference's current value} of every weight in `names`, on the CPU."""
        return {name: self._weights[name].detach().to("cpu", copy=True).contiguous() for name in self._sources}

    @torch.no_grad()
    def load_state_dict(self, tensors: dict) -> None:
        """Set the reference's weights to `tensors` (from `state_dict`); a ValueError when they are
        not exactly this reference's moving weights with their shapes."""
        if set(tensors) != set(self._sources):
            raise ValueError("the saved reference weights are not those of this run's reference")
        for name, value in tensors.items():
            weight = self._weights[name]
            if tuple(value.shape) != tuple(weight.shape):
                raise ValueError(f"the saved reference weight {name} is {list(value.shape)}, not {list(weight.shape)}")
            weight.copy_(value.to(weight.device, weight.dtype))


def _policy_weights(policy) -> dict[str, Callable[[], torch.Tensor]]:
    """{name of a reference weight: a function returning the policy's effective value of it} for
    every weight a training step can change (see MovingReference)."""
    policy = _without_wrappers(policy)
    if not hasattr(policy, "disable_adapter"):
        return {name: (lambda p=p: p) for name, p in policy.named_parameters()}
    sources: dict = {}
    for name, module in policy.named_modules():
        base_name = name.removeprefix(PEFT_PREFIX)
        if isinstance(module, ModulesToSaveWrapper):
            trained = module.modules_to_save[module.active_adapters[0]]
            sources.update({f"{base_name}.{n}": (lambda p=p: p) for n, p in trained.named_parameters()})
        elif hasattr(module, "get_delta_weight"):
            _check_plain_lora(module, base_name)
            sources[f"{base_name}.weight"] = lambda m=module: _merged_weight(m)
    return sources


def _check_plain_lora(layer, name: str) -> None:
    """A PrefoptError for a LoRA variant whose merged weight is not W0 + ΔW (DoRA)."""
    if any(layer.use_dora.get(a, False) for a in layer.active_adapters):
        raise PrefoptError(
            f"{name}: a moving reference (TR-DPO) mixes the merged weight W0 + ΔW of each LoRA layer into the "
            "reference, which DoRA (lora.use_dora) does not have; use plain LoRA or a full fine-tune."
        )


def _merged_weight(layer) -> torch.Tensor:
    """A LoRA layer's effective weight: its base weight plus the delta of each active adapter."""
    weight = layer.get_base_layer().weight
    if layer.disable_adapters or layer.merged:  # merged: the base weight holds the deltas already
        return weight
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A or adapter in getattr(layer, "lora_embedding_A", {}):
            weight = weight + layer.get_delta_weight(adapter)
    return weight
