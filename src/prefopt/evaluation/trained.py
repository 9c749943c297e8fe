"""A trained output folder loaded back as policy + reference, with the config that made it.

    OUT/prefopt.yaml          the resolved training config (beta, loss, data options, base model)
    OUT/adapter_config.json   LoRA: the policy is base + adapter, the reference the adapter disabled
    OUT/config.json           full fine-tune: the policy is OUT, the reference the base model named
                              in prefopt.yaml (a second copy in memory)

A checkpoint folder (OUT/checkpoint-N) works too: its config is read from OUT.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from peft import PeftModel

from prefopt import config as config_mod
from prefopt import losses
from prefopt.errors import PrefoptError
from prefopt.modeling import load

log = logging.getLogger("prefopt")


@dataclass
class Trained:
    """A trained run loaded back: policy, reference, tokenizer, config and loss of OUT."""

    model: object  # the policy (a peft model for LoRA)
    ref_model: Optional[object]  # the frozen reference for a full fine-tune; None for LoRA
    tokenizer: object
    cfg: object  # prefopt.config.Config of the run
    spec: object  # prefopt.losses.LossSpec of the run's loss
    path: Path
    trust_remote_code: bool = False  # the caller's decision, never the folder's

    @property
    def hyper(self) -> dict:
        """The loss's hyperparameters as the run used them (saved in prefopt.yaml)."""
        return {k: getattr(self.cfg.loss, k) for k in self.spec.hyperparameters}

    @property
    def beta(self) -> float:
        """β of the implicit reward (1 for a loss without one)."""
        return losses.reward_scale(self.hyper)

    def reference(self):
        """Context manager yielding the reference model (adapter disabled, or the frozen copy)."""
        if self.ref_model is not None:
            return contextlib.nullcontext(self.ref_model)
        return _disabled(self.model)


@contextlib.contextmanager
def _disabled(model):
    with model.disable_adapter():
        yield model


def find_config(out: Path) -> Path:
    """The prefopt.yaml of output folder `out` (or of its parent, for a checkpoint folder)."""
    for folder in (out, out.parent):
        if (folder / "prefopt.yaml").is_file():
            return folder / "prefopt.yaml"
    raise PrefoptError(
        f"{out}: no prefopt.yaml here or in its parent folder; give the output folder of a "
        "`prefopt train` run (it holds the model and the resolved config)."
    )


def load_trained(out_dir: str, dtype: Optional[str] = None, trust_remote_code: bool = False) -> Trained:
    """The policy, reference, tokenizer and config of the `prefopt train` output folder `out_dir`.

    `trust_remote_code` is the caller's decision (`--trust-remote-code`): the model.trust_remote_code
    of the folder's own prefopt.yaml is ignored, so a downloaded run folder never runs its code."""
    out = Path(out_dir)
    if not out.is_dir():
        raise PrefoptError(f"{out_dir}: no such folder; give the output folder of a `prefopt train` run.")
    cfg = config_mod.load(str(find_config(out)))
    if cfg.model.trust_remote_code and not trust_remote_code:
        log.warning(
            "%s: its prefopt.yaml says model.trust_remote_code: true; ignored: running a model's code is your "
            "decision (--trust-remote-code), not the folder's",
            out,
        )
    spec = config_mod.resolve_loss(cfg.loss)
    tokenizer_dir = out if (out / "tokenizer_config.json").is_file() else load.resolve(cfg.model.name)
    tokenizer = load.load_tokenizer(str(tokenizer_dir), trust_remote_code=trust_remote_code)
    base_path = load.resolve(cfg.model.name)
    common = dict(
        dtype=dtype or cfg.model.dtype,
        attn_implementation=cfg.model.attn_implementation,
        revision=cfg.model.revision,
        trust_remote_code=trust_remote_code,
    )
    if (out / "adapter_config.json").is_file():
        model, ref_model = _load_adapter(out, load.load_model(base_path, **common)), None
    elif (out / "config.json").is_file():
        model = load.load_model(str(out), **{**common, "revision": None})
        ref_model = load.load_model(base_path, **common) if spec.needs_reference else None
    else:
        raise PrefoptError(
            f"{out}: holds neither a model (config.json) nor a LoRA adapter (adapter_config.json); "
            "was the training run finished? (an interrupted run's weights are in its checkpoint-N "
            "folders)"
        )
    model.eval()
    if ref_model is not None:
        ref_model.requires_grad_(False).eval()
    return Trained(model, ref_model, tokenizer, cfg, spec, out, trust_remote_code)


def _load_adapter(out: Path, base):
    """The LoRA adapter of `out` on `base`; a missing or corrupt adapter file a PrefoptError."""
    load.check_weights(out)
    try:
        with load.quiet_peft():
            return PeftModel.from_pretrained(base, str(out))
    except load.LOAD_ERRORS as e:
        raise PrefoptError(
            f"{out}: could not load the LoRA adapter ({type(e).__name__}: {load.detail(e)}); "
            "adapter_config.json or adapter_model.safetensors is corrupt or belongs to another base model."
        ) from None
