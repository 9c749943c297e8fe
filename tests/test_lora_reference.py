"""Reference log-probs with LoRA (the policy with its adapter off) and the on-disk reference cache."""

from __future__ import annotations

import copy
import logging
import random

import pytest
import torch

from prefopt.config import LoraConfig
from prefopt.data.collate import Collator
from prefopt.modeling import reference
from prefopt.modeling.load import add_lora, load_model
from prefopt.modeling.logprobs import sequence_logps


def reference_logps(model, batch, ref_model=None, chunk=1024):
    return reference.outputs(model, batch, ref_model, chunk)["logps"]


def make_examples(n: int = 6, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def ids(k):
        return [rng.randrange(3, 49152) for _ in range(k)]

    return [
        {
            "prompt_ids": ids(rng.randint(1, 20)),
            "chosen_ids": ids(rng.randint(1, 15)),
            "rejected_ids": ids(rng.randint(1, 15)),
        }
        for _ in range(n)
    ]


def perturb_adapter(model, seed: int = 0) -> int:
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
                n += 1
    return n


@pytest.fixture()
def lora_model(tiny_dir):
    model = add_lora(load_model(tiny_dir, dtype="float32"), LoraConfig())
    assert perturb_adapter(model) > 0
    return model


@pytest.fixture(scope="module")
def base_model(tiny_dir):
    return load_model(tiny_dir, dtype="float32").eval()


def test_reference_is_base_model_without_adapter(lora_model, base_model):
    examples = make_examples()
    batch = Collator(2)(examples)
    lora_model.train()
    ref = reference_logps(lora_model, batch, chunk=4)
    assert not ref.requires_grad
    with torch.no_grad():
        base = sequence_logps(base_model, batch, 0)["logps"]
        policy = sequence_logps(lora_model, batch, 0)["logps"]
    torch.testing.assert_close(ref, base, atol=1e-4, rtol=0)
    # the perturbed adapter really changes the policy: the reference is not just the policy
    assert (policy - base).abs().max() > 0.1
    # and the adapter is back on afterwards
    with torch.no_grad():
        again = sequence_logps(lora_model, batch, 0)["logps"]
    torch.testing.assert_close(again, policy, atol=1e-5, rtol=0)


def test_reference_with_ref_model_or_precomputed(tiny_dir, base_model):
    examples = make_examples(seed=1)
    batch = Collator(2)(examples)
    policy = load_model(tiny_dir, dtype="float32")
    with torch.no_grad():
        policy.model.embed_tokens.weight.add_(0.05)
        expected = sequence_logps(base_model, batch, 0)["logps"]
    torch.testing.assert_close(reference_logps(policy, batch, ref_model=base_model), expected, atol=1e-4, rtol=0)
    batch["ref_logps"] = torch.arange(len(examples) * 2, dtype=torch.float32)
    assert reference_logps(policy, batch) is batch["ref_logps"]
    del batch["ref_logps"]
    with pytest.raises(RuntimeError, match="no reference"):
        reference_logps(policy, batch)  # a plain model, no ref_model, no precomputed values


def test_precompute_uses_base_weights_and_caches(lora_model, base_model, tmp_path, caplog):
    cache = tmp_path / "ref-cache"
    collator = Collator(2)
    examples = make_examples(seed=2)
    kw = dict(cache_dir=cache, batch_size=4, chunk=3, autocast_dtype=None, progress=False)

    first = copy.deepcopy(examples)
    reference.precompute(lora_model, first, collator, **kw)
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 1
    with torch.no_grad():
        base = sequence_logps(base_model, collator(examples), 0)["logps"].view(-1, 2)
    got = torch.tensor([ex["ref_logps"] for ex in first], dtype=torch.float64)
    torch.testing.assert_close(got, base.double(), atol=1e-4, rtol=0)

    # second call: reads the cache file (proved by planting recognisable values in it)
    from safetensors.torch import load_file, save_file

    stored = load_file(str(files[0]))["ref_logps"]
    torch.testing.assert_close(stored, got)
    planted = stored + 1000.0
    save_file({"ref_logps": planted}, str(files[0]))
    second = copy.deepcopy(examples)
    with caplog.at_level(logging.INFO, logger="prefopt"):
        reference.precompute(lora_model, second, collator, **kw)
    assert torch.tensor([ex["ref_logps"] for ex in second], dtype=torch.float64).equal(planted)
    assert any("reusing" in r.getMessage() for r in caplog.records)
    assert sorted(cache.glob("*.safetensors")) == files

    # a different adapter does not change the reference, so the key stays the same
    perturb_adapter(lora_model, seed=1)
    assert reference.weights_fingerprint(lora_model) == reference.weights_fingerprint(base_model)
    # a changed base weight does
    with torch.no_grad():
        lora_model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight[0, 0] += 1e-3
    assert reference.weights_fingerprint(lora_model) != reference.weights_fingerprint(base_model)
    third = copy.deepcopy(examples)
    reference.precompute(lora_model, third, collator, **kw)
    assert len(list(cache.glob("*.safetensors"))) == 2
    assert torch.tensor([ex["ref_logps"] for ex in third]).abs().max() < 1000  # computed afresh


def test_cache_key_covers_data_and_layout(base_model, tmp_path):
    cache = tmp_path / "ref-cache"
    kw = dict(cache_dir=cache, batch_size=4, chunk=0, autocast_dtype=None, progress=False)
    examples = make_examples(seed=3)
    reference.precompute(base_model, copy.deepcopy(examples), Collator(2), **kw)
    assert len(list(cache.glob("*.safetensors"))) == 1

    changed = copy.deepcopy(examples)
    changed[-1]["rejected_ids"] = changed[-1]["rejected_ids"][:-1] + [changed[-1]["rejected_ids"][-1] ^ 1]
    reference.precompute(base_model, changed, Collator(2), **kw)
    assert len(list(cache.glob("*.safetensors"))) == 2
    with torch.no_grad():
        direct = sequence_logps(base_model, Collator(2)([changed[-1]]), 0)["logps"]
    assert changed[-1]["ref_logps"] == pytest.approx(direct.tolist(), abs=1e-4)

    # moving a token from the prompt to the response is a different example with the same ids
    moved = copy.deepcopy(examples)
    moved[0]["chosen_ids"] = moved[0]["prompt_ids"][-1:] + moved[0]["chosen_ids"]
    moved[0]["prompt_ids"] = moved[0]["prompt_ids"][:-1] or [5]
    assert reference.data_fingerprint(moved) != reference.data_fingerprint(examples)

    reference.precompute(base_model, copy.deepcopy(examples), Collator(2, prefix_sharing=False), **kw)
    assert len(list(cache.glob("*.safetensors"))) == 3

    a = reference.data_fingerprint(examples)
    assert a == reference.data_fingerprint(copy.deepcopy(examples))
    assert a != reference.data_fingerprint(examples[:-1])
    assert a != reference.data_fingerprint(examples[::-1])
