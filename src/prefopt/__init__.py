"""prefopt: Direct Preference Optimization and its reward-free family.

    import prefopt
    prefopt.train({"data": {"train": "pairs.jsonl"}, "train": {"output_dir": "runs/mine"}})
    prefopt.train(cfg, model=model, tokenizer=tokenizer, train_dataset=dataset)   # objects of your own
    trainer = prefopt.PreferenceTrainer(model, args, train_dataset=ds, processing_class=tok, loss="sigmoid")

The names below are imported when first used, so `import prefopt` stays light (no torch).
"""

import os as _os
import sys as _sys
import warnings as _warnings

# OpenMP reads OMP_WAIT_POLICY once, when torch loads it; its default (spin-waiting) made training
# several times slower on a busy CPU (the CLI sets the same). It only takes effect when prefopt is
# imported before torch, or when the variable is set in the environment.
if "OMP_WAIT_POLICY" not in _os.environ and "torch" in _sys.modules:
    _warnings.warn(
        "prefopt: torch was imported before prefopt with OMP_WAIT_POLICY unset: OpenMP threads spin-wait, which "
        "can make training several times slower on a busy CPU; import prefopt first, or set OMP_WAIT_POLICY=PASSIVE",
        stacklevel=2,
    )
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "0.1.0"

_LAZY = {
    "train": ("prefopt.recipes.train", "train"),
    "PreferenceTrainer": ("prefopt.training.trainer", "PreferenceTrainer"),
    "Config": ("prefopt.config", "Config"),
    "load_config": ("prefopt.config", "load"),
    "losses": ("prefopt.losses", None),
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    """The public names of _LAZY, imported on first use."""
    if name not in _LAZY:
        raise AttributeError(f"module 'prefopt' has no attribute '{name}'")
    import importlib

    module, attribute = _LAZY[name]
    value = importlib.import_module(module)
    return value if attribute is None else getattr(value, attribute)
