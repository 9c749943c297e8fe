"""A training run owns its output folder.

paths     output_dir is a folder we can write, and not the model folder we read (outputs never
          overwrite inputs)
lock      an exclusive lock on OUT/.prefopt.lock for the run's lifetime (released by the OS when
          the process dies, kill -9 included): a second run into the same folder is an error
outputs   a folder holding another run's model, checkpoints or log is refused unless the run
          continues it (--resume) or replaces it (--overwrite, which first removes them)
resume    a checkpoint records the config and a fingerprint of the training data it was trained
          with; --resume refuses a different config (but for RESUMABLE_KEYS) or different data,
          unless --force, which is recorded in OUT/resumes.jsonl
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import yaml

from prefopt.config import Config
from prefopt.errors import PrefoptError
from prefopt.training import checkpoints

log = logging.getLogger("prefopt")

LOCK_FILE = ".prefopt.lock"
RESUMES_FILE = "resumes.jsonl"  # one line per --resume --force: what differed
# keys that may differ when resuming: they change where things are logged or read from, not the
# training trajectory (the data's content is checked by its fingerprint)
RESUMABLE_KEYS = (
    "train.progress",
    "train.gradient_checkpointing",  # exact (tested equal to no checkpointing): memory, not maths
    "train.lm_head_chunk",  # exact: memory
    "train.prefix_sharing",  # exact: speed
    "train.attention",  # exact in float32 (bit for bit), bf16 rounding under autocast: speed, memory
    "train.logging_steps",
    "train.save_steps",
    "train.save_total_limit",
    "train.eval_steps",
    "train.report_to",
    "train.num_workers",
    "reference.cache_dir",
    "train.push_to_hub",
    "train.hub_model_id",
    "train.hub_private",
    "data.train",
    "data.eval",
)
# what a run writes into its folder: any of these means the folder holds a run
RUN_OUTPUTS = (
    "prefopt.yaml",
    "metrics.jsonl",
    "config.json",
    "adapter_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_model.safetensors",
    "generation_config.json",
    "training_args.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "README.md",
    RESUMES_FILE,
    "merged",
    "report",
    checkpoints.STAGING,
)
_held: dict = {}  # folder -> the open lock file this process holds on it (closing it releases the lock)


def claim(cfg: Config, model_path: str, *, resume: bool, overwrite: bool, is_main: bool) -> Path:
    """Make cfg.train.output_dir this run's: checked, locked (by the main process), and emptied of
    another run's outputs when `overwrite`. Returns the folder."""
    out = Path(cfg.train.output_dir)
    check_paths(out, model_path)
    if is_main:
        lock(out)
    try:
        _refuse_or_clear(out, resume=resume, overwrite=overwrite, is_main=is_main, reads=_inputs(cfg, model_path))
    except BaseException:
        release(out)
        raise
    return out


def _inputs(cfg: Config, model_path: str) -> list[Path]:
    """The paths this run reads: the model, the data sources (a `:split` suffix dropped) and a
    GRPO prompts or problems file (grpo.prompts: a path, or code:PATH)."""
    prompts = cfg.grpo.prompts.removeprefix("code:") if cfg.grpo.prompts not in ("code", "sentiment") else None
    paths = [model_path] + [s for s in (cfg.data.train, cfg.data.eval, prompts) if isinstance(s, str)]
    found = []
    for path in paths:
        for candidate in (path, path.rsplit(":", 1)[0]):
            if Path(candidate).exists():
                found.append(Path(candidate).resolve())
                break
    return found


def _refuse_or_clear(out: Path, *, resume: bool, overwrite: bool, is_main: bool, reads: list[Path]) -> None:
    """A PrefoptError when `out` holds another run's outputs and the run neither resumes nor
    overwrites it; with `overwrite` the main process removes them — never one this run reads."""
    prior = prior_outputs(out)
    for path in prior if overwrite else []:
        used = [r for r in reads if r == path.resolve() or path.resolve() in r.parents]
        if used:
            raise PrefoptError(
                f"--overwrite would remove {path}, which this run reads ({used[0]}); train from a copy outside "
                f"{out}, or choose another train.output_dir."
            )
    if prior and not (resume or overwrite):
        shown = ", ".join(p.name for p in prior[:6]) + (", ..." if len(prior) > 6 else "")
        raise PrefoptError(
            f"config: 'train.output_dir' ({out}) holds another run's outputs ({shown}); continue that run with "
            "--resume, replace it with --overwrite (its model and checkpoints are removed first), or choose "
            "another train.output_dir."
        )
    if prior and overwrite and is_main:
        for path in prior:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        log.warning("--overwrite: removed the previous run's outputs from %s", out)


def check_paths(out: Path, model_path: str) -> None:
    """output_dir must be (or be creatable as) a writable folder, and not the model folder."""
    if Path(model_path).exists() and out.resolve() == Path(model_path).resolve():
        raise PrefoptError(
            f"config: 'train.output_dir' ({out}) is the model folder this run reads (model.name); the trained "
            "model would overwrite its base. Choose another train.output_dir."
        )
    for parent in [out, *out.parents]:
        if parent.exists():
            if not parent.is_dir():
                what = "is a file" if parent == out else f"is under {parent}, which is a file"
                raise PrefoptError(f"config: 'train.output_dir' ({out}) {what}; give a folder.")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise PrefoptError(
                    f"config: 'train.output_dir' ({out}): {parent} is not writable; give a folder you can write."
                )
            return


def lock(out: Path) -> None:
    """Hold an exclusive lock on OUT/.prefopt.lock until this process ends (a PrefoptError naming
    the holder when another process has it)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / LOCK_FILE, "a+")
    except OSError as e:
        raise PrefoptError(f"config: 'train.output_dir' ({out}): cannot write there: {e.strerror or e}.") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise PrefoptError(
            f"config: 'train.output_dir' ({out}) is in use by another prefopt run ({holder}); wait for it to "
            "finish or choose another train.output_dir."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    _held[out.resolve()] = handle


def release(out: Path) -> None:
    """Release this process's lock on `out` (a no-op when it holds none)."""
    handle = _held.pop(Path(out).resolve(), None)
    if handle is not None:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def prior_outputs(out: Path) -> list[Path]:
    """The outputs of a run found in `out`: its checkpoints and the files RUN_OUTPUTS names."""
    if not out.is_dir():
        return []
    found = [p for p in sorted(out.iterdir()) if p.name in RUN_OUTPUTS]
    return found + [p for p in sorted(out.iterdir()) if checkpoints.step_of(p) is not None and p.is_dir()]


def run_info(cfg: Config, data_fingerprint: str) -> dict:
    """What a checkpoint records of its run: the resolved config and the training data's fingerprint."""
    return {"config": cfg.resolved(), "data": data_fingerprint}


def check_resume(cfg: Config, checkpoint: Path, data_fingerprint: str, *, force: bool, record: bool = True) -> None:
    """A PrefoptError when `checkpoint` was trained with another config (RESUMABLE_KEYS aside) or
    other training data; with `force`, a warning, recorded in OUT/resumes.jsonl (by the process
    with `record`: the main one)."""
    saved = _saved_identity(checkpoint)
    if saved is None:
        log.warning(
            "--resume: %s does not record its config and data (an older prefopt wrote it); they cannot be checked",
            checkpoint,
        )
        return
    before, data = saved
    differences = [f"{k}: {a!r} -> {b!r}" for k, a, b in _changed(before, cfg.resolved())]
    if data is not None and data != data_fingerprint:
        differences.append(f"the training data (data.train = {cfg.data.train}) tokenize to other examples")
    if not differences:
        return
    what = "; ".join(differences)
    if not force:
        raise PrefoptError(
            f"--resume: {checkpoint} was trained with other settings ({what}); resuming would not continue that "
            "run. Undo the change, start a new run in another train.output_dir, or add --force to resume anyway."
        )
    log.warning("--resume --force: resuming %s although %s", checkpoint, what)
    if not record:
        return
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "checkpoint": checkpoint.name, "differences": differences}
    with open(checkpoint.parent / RESUMES_FILE, "a") as f:
        f.write(json.dumps(entry) + "\n")


def _saved_identity(checkpoint: Path) -> Optional[tuple[dict, Optional[str]]]:
    """(config, data fingerprint) a checkpoint was trained with: its run file, or for a checkpoint
    without one the folder's prefopt.yaml (no fingerprint); None when neither exists."""
    run_file = checkpoint / checkpoints.RUN_FILE
    if run_file.is_file():
        info = json.loads(run_file.read_text())
        return info["config"], info.get("data")
    saved = checkpoint.parent / "prefopt.yaml"
    if saved.is_file():
        return yaml.safe_load(saved.read_text()) or {}, None
    return None


def _changed(before: dict, now: dict) -> list[tuple[str, object, object]]:
    """(section.key, old, new) of every key whose value differs, RESUMABLE_KEYS aside."""
    out = []
    for section, keys in now.items():
        old = before.get(section)
        if not isinstance(keys, dict) or not isinstance(old, dict):
            continue
        for key, value in keys.items():
            name = f"{section}.{key}"
            if name not in RESUMABLE_KEYS and key in old and old[key] != value:
                out.append((name, old[key], value))
    return out
