"""Warnings for the known failure modes of preference training, while there is time to stop.

A TrainerCallback that reads the logged metrics (a window of the last `window` training logs) and
warns once per failure mode, naming the step:

    non-finite       loss or grad norm NaN/inf: stop now (nothing more is saved)
    broken setup     margins exactly zero after several steps: policy == reference (lr 0, frozen or
                     detached parameters, an adapter that is not trained)
    suppression      chosen and rejected implicit rewards both negative and the chosen one falling:
                     the margin is won by pushing both log-probs down (Pal et al. 2024; Razin et al.
                     2024); remedies: loss dpop (a penalty when the chosen log-prob falls below the
                     reference's) or rpo (an SFT term on chosen)
    length           implicit reward correlating with response length (rewards/length_corr over the
                     trainer's recent sequences): the policy may be learning length, not quality;
                     remedies: loss sampo (down-sampled, length-balanced log-ratios), loss.ld_alpha
                     (LD-DPO) or simpo (per-token reward)
    over-optimising  margins growing at every log and already large: the loss is driven to zero by
                     ever-larger log-ratios; remedies: a larger β, or loss ipo (a bounded target)
    no reward signal GRPO: every group's completions scored the same (frac_reward_zero_std = 1) over
                     the window: no advantage, no step; remedies: more completions per prompt,
                     easier prompts, a reward with partial credit

Each warning names its remedies and links to their sections of docs/losses.md (REMEDY_DOCS).
"""

from __future__ import annotations

import logging
import math
from collections import deque

from transformers import TrainerCallback

log = logging.getLogger("prefopt")

LOSSES_DOC = "docs/losses.md"
# the section of docs/losses.md on each remedy a warning names
REMEDY_DOCS = {
    "dpop": f"{LOSSES_DOC}#dpop",
    "rpo": f"{LOSSES_DOC}#rpo",
    "sampo": f"{LOSSES_DOC}#sampo",
    "ld_alpha": f"{LOSSES_DOC}#ld-dpo",
    "simpo": f"{LOSSES_DOC}#simpo",
    "ipo": f"{LOSSES_DOC}#ipo",
}


def _see(*remedies: str) -> str:
    return "see " + ", ".join(REMEDY_DOCS[r] for r in remedies)


class FailureMonitor(TrainerCallback):
    """Watches the logged metrics and warns once per failure mode (see the module docstring);
    stops training on a non-finite loss or gradient norm (`nonfinite_step` says where)."""

    def __init__(self, window: int = 5, margin_limit: float = 5.0, length_corr: float = 0.5):
        self.window = window
        self.margin_limit = margin_limit  # implicit-reward units (losses.implicit_rewards): σ(5) = 0.993
        self.length_corr = length_corr
        self.history: deque = deque(maxlen=window)
        self.zero_std: deque = deque(maxlen=window)  # GRPO's frac_reward_zero_std of the last sampled batches
        self.warned: dict[str, int] = {}  # failure mode -> step of its warning
        self.nonfinite_step = None
        self.speak = True  # logs are global under DDP: only rank 0 says what they show

    def warn(self, kind: str, step: int, message: str) -> None:
        """Log `message` for failure mode `kind` unless it was already said."""
        if kind not in self.warned:
            self.warned[kind] = step
            if self.speak:
                log.warning("step %d: %s", step, message)

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Check the training log of this step (evaluation logs are ignored)."""
        if not logs or "loss" not in logs or any(k.startswith("eval_") for k in logs):
            return
        step = state.global_step
        self.speak = state.is_world_process_zero
        if self._nonfinite(logs, step):
            control.should_training_stop = True
            return
        self.history.append(logs)
        if "frac_reward_zero_std" in logs:  # GRPO logs it on the steps that sample
            self.zero_std.append(logs["frac_reward_zero_std"])
            self._no_signal(step)
        if len(self.history) < self.window or "rewards/margins" not in logs:
            return
        self._zero_margins(step)
        self._suppression(logs, step)
        self._length(logs, step)
        self._over_optimising(step)

    def _nonfinite(self, logs: dict, step: int) -> bool:
        for key in ("loss", "grad_norm"):
            value = logs.get(key)
            if value is not None and not math.isfinite(value):
                self.nonfinite_step = step
                self.warn(
                    "non-finite",
                    step,
                    f"{key} is {value}: training stops here; nothing is saved from this step on "
                    "(the newest checkpoint verified finite is the last good one). Lower train.lr or check the data.",
                )
                return True
        return False

    def _no_signal(self, step: int) -> None:
        """GRPO: every group of the window scored all its completions the same."""
        if len(self.zero_std) == self.window and min(self.zero_std) >= 1.0:
            self.warn(
                "no reward signal",
                step,
                f"in each of the last {self.window} sampled batches every group's completions got the same "
                "reward (frac_reward_zero_std = 1): their advantages are 0, so the policy gradient is 0 (only "
                "the KL term, when grpo.beta > 0, moves the policy); use more grpo.num_generations, easier "
                "prompts, or a reward with partial credit (tests, not tests_binary).",
            )

    def _zero_margins(self, step: int) -> None:
        margins = [r["rewards/margins"] for r in self.history]
        if all(abs(m) < 1e-7 for m in margins) and step > self.window:
            self.warn(
                "broken setup",
                step,
                f"implicit-reward margins have been exactly 0 for {self.window} logs: "
                "the policy still equals the reference (is anything trained? train.lr, frozen parameters, "
                "a LoRA adapter that receives no gradient).",
            )

    def _suppression(self, logs: dict, step: int) -> None:
        chosen = [r.get("rewards/chosen") for r in self.history]
        rejected = [r.get("rewards/rejected") for r in self.history]
        if None in chosen or None in rejected or "logps/ref_chosen" not in logs:
            return
        if (
            all(c < 0 for c in chosen[-2:])
            and all(x < 0 for x in rejected[-2:])
            and chosen[-1] < chosen[0]
            and self.history[-1]["rewards/margins"] > 0
        ):
            self.warn(
                "suppression",
                step,
                f"chosen log-probs are falling together with rejected ones "
                f"(rewards/chosen {chosen[0]:.3g} -> {chosen[-1]:.3g}, rewards/rejected "
                f"{rejected[-1]:.3g}): the margin is won by suppressing both. Remedies: loss.name dpop "
                "(DPO-Positive: a penalty when the chosen log-prob falls below the reference's) or "
                f"loss.name rpo (an SFT term on chosen), or a smaller learning rate; {_see('dpop', 'rpo')}.",
            )

    def _length(self, logs: dict, step: int) -> None:
        corr = logs.get("rewards/length_corr")
        if corr is not None and corr > self.length_corr:
            self.warn(
                "length",
                step,
                f"implicit reward correlates with response length (r = {corr:.2f} over "
                "recent sequences): the policy may be exploiting length. Remedies: loss.name sampo (SamPO: "
                "log-ratios over equally many tokens of each response), loss.ld_alpha (LD-DPO) or loss.name "
                "simpo (a per-token reward); check the data's length bias with `prefopt data check`; "
                f"{_see('sampo', 'ld_alpha', 'simpo')}.",
            )

    def _over_optimising(self, step: int) -> None:
        margins = [r["rewards/margins"] for r in self.history]
        if margins[-1] > self.margin_limit and all(b > a for a, b in zip(margins, margins[1:])):
            self.warn(
                "over-optimising",
                step,
                f"margins grow at every log and reached {margins[-1]:.3g} "
                f"(implicit-reward units; the loss is near 0): the log-ratios can grow without bound. "
                "Remedies: a larger loss.beta, or loss.name ipo (a bounded target); "
                f"{_see('ipo')}.",
            )
