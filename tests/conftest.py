"""Shared fixtures: the embedded SmolLM2 model folder, a tiny random Llama with its tokenizer, the
shared real data folder."""

from __future__ import annotations

import os

# Before torch is imported: OpenMP spin-waiting makes torch several times slower on a busy CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smol_dir() -> str:
    """The embedded SmolLM2-135M-Instruct as a safetensors folder (converted once into the cache)."""
    from prefopt.modeling import load

    return load.resolve("default")


@pytest.fixture(scope="session")
def smol_tokenizer(smol_dir):
    from prefopt.modeling import load

    return load.load_tokenizer(smol_dir)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smol_tokenizer) -> str:
    """A tiny randomly initialised Llama with the real SmolLM2 tokenizer, saved as a model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = smol_tokenizer
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the project; tests using it skip when it is absent."""
    path = REPO.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} is absent (real-data tests need ../shared/data)")
    return path
