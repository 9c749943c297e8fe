"""Checkpoints that survive a crash, resume from the newest complete one, and a clean Ctrl-C.

A checkpoint is written into OUT/.partial/checkpoint-N by transformers' own checkpoint code
(model, optimizer, scheduler, RNG states, trainer_state.json) and only then renamed to
OUT/checkpoint-N. A kill at any moment leaves either the previous checkpoints untouched or the
new one complete: `latest()` never sees a half-written folder. Resuming hands that folder to
`Trainer.train(resume_from_checkpoint=...)`, which restores optimizer, scheduler, RNG and step and
skips the batches already seen, so the data order is the uninterrupted run's.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Optional

import torch
from transformers import TrainerCallback

log = logging.getLogger("prefopt")

PREFIX = "checkpoint-"
STAGING = ".partial"  # checkpoints being written; never read
COMPLETE_MARKER = "trainer_state.json"  # transformers writes it last
RUN_FILE = "prefopt_run.json"  # in a checkpoint: the config and data it was trained with, verified finite


def step_of(path: Path) -> Optional[int]:
    """The step of a checkpoint-N folder (None for any other name)."""
    m = re.fullmatch(PREFIX + r"(\d+)", path.name)
    return int(m.group(1)) if m else None


def complete(output_dir) -> list[Path]:
    """The complete checkpoints in `output_dir`, oldest step first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and step_of(p) is not None and (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=step_of)


def latest(output_dir) -> Optional[Path]:
    """The newest complete checkpoint in `output_dir`, or None."""
    found = complete(output_dir)
    return found[-1] if found else None


def finished(checkpoint: Path) -> bool:
    """Whether `checkpoint` was saved at the run's last step (its max_steps reached)."""
    state = json.loads((checkpoint / COMPLETE_MARKER).read_text())
    return state.get("max_steps", 0) > 0 and state.get("global_step", 0) >= state["max_steps"]


def last_good(output_dir) -> Optional[Path]:
    """The newest complete checkpoint verified finite when it was saved (its RUN_FILE says so), or None."""
    for checkpoint in reversed(complete(output_dir)):
        run_file = checkpoint / RUN_FILE
        if run_file.is_file() and json.loads(run_file.read_text()).get("finite"):
            return checkpoint
    return None


def _fsync_tree(path: Path) -> None:
    """Flush every file of `path` (and the folder entries) to disk, so a power loss after the
    rename cannot leave a renamed folder of empty files."""
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(staged: Path, final: Path) -> None:
    """Make the fully written checkpoint `staged` visible as `final` by one rename. An existing
    `final` (the same step saved again) is moved aside first and removed afterwards."""
    _fsync_tree(staged)
    old = None
    if final.exists():
        old = staged.parent / f"old-{final.name}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(staged, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prune(output_dir, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (keep <= 0: keep all)."""
    if keep <= 0:
        return
    for path in complete(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def clear_staging(output_dir) -> None:
    """Remove what a killed save left behind."""
    shutil.rmtree(Path(output_dir) / STAGING, ignore_errors=True)


class GracefulStop(TrainerCallback):
    """Ctrl-C (SIGINT) or SIGTERM: finish the current optimizer step, save a checkpoint, stop.
    A second Ctrl-C aborts at once. Under DDP every rank stops at the same step (the request is
    all-reduced each step), so no rank waits forever in a collective."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.stopped_at: Optional[int] = None
        self._previous = {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning(
            "%s: stopping after this step and saving a checkpoint (Ctrl-C again to abort at once)",
            signal.Signals(signum).name,
        )

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handler)

    def on_train_end(self, args, state, control, **kwargs):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _anyone_requested(self, args) -> bool:
        flag = self.requested
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.tensor([int(flag)], device=args.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def on_step_end(self, args, state, control, **kwargs):
        if self._anyone_requested(args):
            self.requested = True
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control
