"""The loss family from training: every registered loss (and a `combine` config) through
prefopt.recipes.train.train on a tiny model, shape errors, and the LD-DPO / WPO modifiers checked against a
direct per-sequence computation from the model's full logits."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from prefopt import config, losses
from prefopt.data.collate import Collator
from prefopt.data.formats import load_pairs
from prefopt.data.tokenize import tokenize_pairs
from prefopt.errors import PrefoptError
from prefopt.modeling import load, reference
from prefopt.modeling.logprobs import sequence_logps
from prefopt.recipes import train as train_mod
from prefopt.training import setup as training_setup

PAIRS = [
    ("What is the capital of France?", "Paris.", "I believe it is Lyon, or maybe Marseille; it is hard to say."),
    ("Name a primary colour.", "Red is a primary colour, as are blue and yellow.", "Green."),
    ("How many legs does a spider have?", "Eight legs.", "Six, like every other insect I know of."),
    ("Say hello politely.", "Hello, it is very nice to meet you today.", "Go away."),
    ("What is two plus two?", "Four.", "Twenty two, if you write the digits side by side."),
    ("Give a synonym for happy.", "Joyful is a good synonym for happy.", "Sad."),
    ("Which planet is the largest?", "Jupiter.", "The Sun, obviously, since it is the biggest thing around."),
    ("What do bees make?", "Bees make honey and wax in their hives.", "Milk."),
]
UNPAIRED = [
    ("What is the capital of France?", "Paris.", True),
    ("What is the capital of France?", "Berlin, I am fairly sure.", False),
    ("Name a primary colour.", "Blue is a primary colour.", True),
    ("Name a primary colour.", "Purple.", False),
    ("What is two plus two?", "Four.", True),
    ("What is two plus two?", "Five, on a good day.", False),
    ("What do bees make?", "Honey.", True),
    ("What do bees make?", "Cheese, mostly in spring.", False),
]


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("loss-data")
    paired, unpaired = d / "pairs.jsonl", d / "unpaired.jsonl"
    paired.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS))
    unpaired.write_text("".join(json.dumps({"prompt": p, "completion": c, "label": y}) + "\n" for p, c, y in UNPAIRED))
    return {"paired": str(paired), "unpaired": str(unpaired)}


def make_cfg(tiny_dir, data: str, tmp_path: Path, loss: dict, **train) -> config.Config:
    return config.from_dict(
        {
            "model": {"name": tiny_dir},
            "data": {"train": data, "max_length": 64, "max_prompt_length": 32},
            "loss": loss,
            "reference": {"cache_dir": str(tmp_path / "refcache")},
            "train": {
                "output_dir": str(tmp_path / "out"),
                "max_steps": 2,
                "batch_size": 2,
                "progress": False,
                "bf16": False,
                "lr": 1e-3,
                "warmup_ratio": 0.0,
                **train,
            },
        }
    )


def metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# (a) every loss trains for 2 steps through prefopt.recipes.train.train
# --------------------------------------------------------------------------------------------

COMBINE = {"name": "combine", "weights": {"dpo": 0.8, "bco_pair": 0.2, "sft": 1.0}, "ld_alpha": 0.5, "wpo": True}
COMBINE_FREE = {"name": "combine", "weights": {"simpo": 1.0, "sft": 0.5}}


@pytest.mark.parametrize("loss", losses.names() + ["combine", "combine_free"])
def test_every_loss_trains(loss, tiny_dir, data_files, tmp_path, monkeypatch):
    loss_cfg = {"combine": COMBINE, "combine_free": COMBINE_FREE}.get(loss, {"name": loss})
    cfg = make_cfg(tiny_dir, data_files["paired"], tmp_path, loss_cfg)
    spec = config.resolve_loss(cfg.loss)
    if not spec.paired:
        cfg.data.train = data_files["unpaired"]

    calls = {"precompute": 0, "reference_forward": 0}
    real_precompute = reference.precompute

    def counting_precompute(*a, **k):
        calls["precompute"] += 1
        return real_precompute(*a, **k)

    real_outputs = reference.outputs

    def counting_outputs(*a, **k):
        calls["reference_forward"] += 1
        return real_outputs(*a, **k)

    monkeypatch.setattr(reference, "precompute", counting_precompute)
    monkeypatch.setattr(reference, "outputs", counting_outputs)

    summary = train_mod.train(cfg)
    assert summary["steps"] == 2
    assert summary["last_loss"] is not None and math.isfinite(summary["last_loss"])
    assert summary["first_loss"] is not None and math.isfinite(summary["first_loss"])

    saved = yaml.safe_load((Path(cfg.train.output_dir) / "prefopt.yaml").read_text())["loss"]
    assert saved["name"] == losses.ALIASES.get(loss_cfg["name"], loss_cfg["name"])
    for key, default in spec.hyperparameters.items():  # recorded, with the loss's defaults
        assert saved[key] == default, key
    assert config.from_dict({"loss": saved}).loss == cfg.loss  # the saved loss section reloads as is

    cache = Path(cfg.reference.cache_dir)
    logged = metrics(cfg.train.output_dir)
    keys = set().union(*logged)
    if spec.moving_reference:  # TR-DPO: never precomputed, computed on the fly from the moving copy
        assert cfg.reference.precompute is False
        assert calls["precompute"] == 0 and calls["reference_forward"] >= 2
        assert not cache.exists() or not any(cache.iterdir())
        assert {"logps/ref_chosen", "logps/ref_rejected"} <= keys
    elif spec.needs_reference:
        assert calls["precompute"] >= 1 and calls["reference_forward"] >= 2
        assert list(cache.glob("*.safetensors"))
        if spec.paired:
            assert {"logps/ref_chosen", "logps/ref_rejected"} <= keys
        if spec.token_subset is not None:  # SamPO: the subset's sums precomputed beside the whole ones
            from safetensors.torch import load_file

            (f,) = cache.glob("*.safetensors")
            assert set(load_file(str(f))) == {"ref_logps", "ref_subset_logps"}
    else:
        assert calls["precompute"] == 0 and calls["reference_forward"] == 0
        assert not cache.exists() or not any(cache.iterdir())
        assert not any(k.startswith("logps/ref_") for k in keys)
    if loss == "combine":
        assert saved["weights"] == {"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0}
        assert saved["ld_alpha"] == 0.5 and saved["wpo"] is True
        assert "wpo/weights" in keys
        from safetensors.torch import load_file

        (f,) = cache.glob("*.safetensors")
        assert set(load_file(str(f))) == {"ref_logps", "ref_subset_logps"}
    else:
        assert saved["ld_alpha"] is None and saved["wpo"] is False


def test_combine_from_the_command_line():
    cfg = config.load(None, ["--loss.name", "combine", "--loss.weights", "{sigmoid: 1.0, sft: 0.5}"])
    assert cfg.loss.weights == {"sigmoid": 1.0, "sft": 0.5}
    assert cfg.loss.beta == 0.1 and cfg.loss.f_divergence == "reverse_kl"  # the union's defaults
    spec = config.resolve_loss(cfg.loss)
    assert spec.paired and spec.needs_reference
    assert set(spec.hyperparameters) == {"beta", "label_smoothing", "f_divergence", "f_alpha"}


@pytest.mark.parametrize(
    "weights, fragment",
    [
        (None, "must map each paired loss"),
        ({"kto": 1.0}, "'kto', an unpaired loss"),
        ({"sigmoid": 1.0, "nope": 1.0}, "'nope', which is not a known loss"),
        ({"sigmoid": "heavy"}, "not a number"),
        ("sigmoid", "must be a mapping"),
    ],
)
def test_combine_bad_weights(weights, fragment):
    loss = {"name": "combine"} if weights is None else {"name": "combine", "weights": weights}
    with pytest.raises(PrefoptError, match="loss.weights") as e:
        config.from_dict({"loss": loss})
    assert fragment in str(e.value)


def test_modifier_validation():
    with pytest.raises(PrefoptError, match="'loss.weights' is only used with loss.name: combine"):
        config.from_dict({"loss": {"name": "sigmoid", "weights": {"sigmoid": 1.0}}})
    for key, value in (("ld_alpha", 0.5), ("wpo", True)):
        with pytest.raises(PrefoptError, match=f"'loss.{key}' modifies paired losses"):
            config.from_dict({"loss": {"name": "kto", key: value}})
    with pytest.raises(PrefoptError, match="'loss.ld_alpha' must be in"):
        config.from_dict({"loss": {"name": "sigmoid", "ld_alpha": 1.5}})
    for name in losses.names(paired=True):  # a modifier, valid for every paired loss ...
        if losses.get(name).token_subset is None:
            cfg = config.from_dict({"loss": {"name": name, "ld_alpha": 0.3}})
            assert cfg.loss.ld_alpha == 0.3
        else:  # ... except one that scores its own token subset (SamPO)
            with pytest.raises(PrefoptError, match="'loss.ld_alpha' .* both choose the tokens the loss sees"):
                config.from_dict({"loss": {"name": name, "ld_alpha": 0.3}})


# --------------------------------------------------------------------------------------------
# (b) data of the wrong shape
# --------------------------------------------------------------------------------------------


def test_paired_loss_on_unpaired_data(tiny_dir, data_files, tmp_path):
    cfg = make_cfg(tiny_dir, data_files["unpaired"], tmp_path, {"name": "sigmoid"})
    with pytest.raises(PrefoptError, match=r"needs preference pairs \(prompt, chosen, rejected\)"):
        train_mod.train(cfg)


def test_unpaired_loss_on_paired_data(tiny_dir, data_files, tmp_path):
    cfg = make_cfg(tiny_dir, data_files["paired"], tmp_path, {"name": "kto"})
    with pytest.raises(PrefoptError, match=r"needs unpaired data \(prompt, completion, label"):
        train_mod.train(cfg)


# --------------------------------------------------------------------------------------------
# (c) LD-DPO and (d) WPO against a direct computation from the full logits
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tiny_dir, data_files):
    """(tokenizer, reference model, policy model = a perturbed copy, tokenized pair examples)."""
    tok = load.load_tokenizer(tiny_dir)
    ref_model = load.load_model(tiny_dir, dtype="float32").eval()
    with torch.no_grad():  # peakier next-token distributions: WPO weights well below their cap, but
        ref_model.model.norm.weight.mul_(5.0)  # not vanishing (w ≈ 0.4; without the alignment w ≈ 1e-9)
    policy = copy.deepcopy(ref_model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    pairs, _ = load_pairs(data_files["paired"])
    examples, _ = tokenize_pairs(pairs[:4], tok, max_length=64, max_prompt_length=32)
    assert any(len(e["chosen_ids"]) < len(e["rejected_ids"]) for e in examples)
    assert any(len(e["chosen_ids"]) > len(e["rejected_ids"]) for e in examples)
    return tok, ref_model, policy, examples


@torch.no_grad()
def direct(model, prompt: list[int], response: list[int]):
    """Per-token log p(y_t | …) and log Σ_v p(v | …)² from one plain forward of [prompt + response]."""
    logp = model(torch.tensor([prompt + response])).logits[0].float().log_softmax(-1)
    pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(response))
    return logp[pos, torch.tensor(response)], torch.logsumexp(2 * logp[pos], -1)


def direct_sums(model, examples, prefix_only: bool) -> torch.Tensor:
    out = []
    for ex in examples:
        lp = min(len(ex["chosen_ids"]), len(ex["rejected_ids"]))
        for r in (ex["chosen_ids"], ex["rejected_ids"]):
            tok, _ = direct(model, ex["prompt_ids"], r)
            out.append((tok[:lp] if prefix_only else tok).sum())
    return torch.stack(out)


def trainer_for(cfg, setup, tmp_path, precompute: bool = True):
    tok, ref_model, policy, examples = setup
    collator = training_setup.make_collator(cfg, tok)
    examples = copy.deepcopy(examples)
    if precompute:
        reference.precompute(
            ref_model,
            examples,
            collator,
            cache_dir=tmp_path / "refcache",
            batch_size=4,
            chunk=cfg.train.lm_head_chunk,
            autocast_dtype=None,
            progress=False,
        )
    spec = config.resolve_loss(cfg.loss)
    trainer = training_setup.make_trainer(cfg, spec, policy, tok, collator, examples, [], bf16=False)
    return trainer, collator(examples)


def test_ld_alpha_one_is_plain_dpo(tiny_dir, data_files, setup, tmp_path):
    results = {}
    for name, ld in (("plain", None), ("one", 1.0), ("half", 0.5)):
        loss = {"name": "sigmoid"} if ld is None else {"name": "sigmoid", "ld_alpha": ld}
        cfg = make_cfg(tiny_dir, data_files["paired"], tmp_path / name, loss)
        trainer, batch = trainer_for(cfg, setup, tmp_path)
        assert ("score_subset" in batch) == (ld is not None)
        with torch.no_grad():
            results[name] = trainer.compute_loss(setup[2], batch)
    torch.testing.assert_close(results["one"], results["plain"], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(results["half"], results["plain"], atol=1e-4)
    files = sorted((tmp_path / "refcache").glob("*.safetensors"))
    assert len(files) == 2  # the LD-DPO cache key differs from the plain one


def test_ld_alpha_zero_uses_shared_prefix_sums(tiny_dir, data_files, setup, tmp_path):
    _, ref_model, policy, examples = setup
    cfg = make_cfg(tiny_dir, data_files["paired"], tmp_path, {"name": "sigmoid", "ld_alpha": 0.0})
    trainer, batch = trainer_for(cfg, setup, tmp_path)
    with torch.no_grad():
        loss, out = trainer.compute_loss(policy, batch, return_outputs=True)
    pol = direct_sums(policy, examples, prefix_only=True)
    ref = direct_sums(ref_model, examples, prefix_only=True)
    torch.testing.assert_close(out["loss_logps"], pol, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(out["loss_ref_logps"], ref, atol=1e-3, rtol=1e-5)
    assert not torch.allclose(pol, direct_sums(policy, examples, prefix_only=False), atol=1e-2)
    expected = losses.sigmoid(pol[0::2], pol[1::2], ref[0::2], ref[1::2], beta=0.1).mean()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_ld_without_precompute_uses_reference_model(tiny_dir, data_files, setup, tmp_path):
    _, ref_model, policy, examples = setup
    cfg = make_cfg(tiny_dir, data_files["paired"], tmp_path, {"name": "sigmoid", "ld_alpha": 0.0}, lm_head_chunk=5)
    trainer, batch = trainer_for(cfg, setup, tmp_path, precompute=False)
    trainer.ref_model = ref_model
    with torch.no_grad():
        _, out = trainer.compute_loss(policy, batch, return_outputs=True)
    torch.testing.assert_close(out["loss_ref_logps"], direct_sums(ref_model, examples, True), atol=1e-3, rtol=1e-5)


def test_wpo_weights_match_full_logits(tiny_dir, data_files, setup, tmp_path):
    _, ref_model, policy, examples = setup
    # a small lm-head chunk: the squared mass comes through the checkpointed, chunked path
    cfg = make_cfg(tiny_dir, data_files["paired"], tmp_path, {"name": "sigmoid", "wpo": True}, lm_head_chunk=5)
    trainer, batch = trainer_for(cfg, setup, tmp_path)
    loss, out = trainer.compute_loss(policy, batch, return_outputs=True)
    loss.backward()  # grads flow through the chunked lm-head with the extra output
    assert policy.lm_head.weight.grad is not None or policy.model.embed_tokens.weight.grad is not None
    policy.zero_grad(set_to_none=True)

    means = []
    for ex in examples:
        for r in (ex["chosen_ids"], ex["rejected_ids"]):
            tok, sq = direct(policy, ex["prompt_ids"], r)
            means.append((tok - sq).mean())
    means = torch.stack(means)
    w = torch.exp(means[0::2] + means[1::2]).clamp(max=1.0)
    assert (w < 0.9).all() and (w > 0.05).all()  # neither capped nor vanishing: the check means something
    torch.testing.assert_close(out["wpo_weights"], w, atol=1e-6, rtol=1e-4)

    pol = direct_sums(policy, examples, prefix_only=False)
    ref = direct_sums(ref_model, examples, prefix_only=False)
    per_pair = losses.sigmoid(pol[0::2], pol[1::2], ref[0::2], ref[1::2], beta=0.1)
    torch.testing.assert_close(loss.detach(), (w * per_pair).mean(), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(loss.detach(), per_pair.mean(), atol=1e-4)


def test_sq_mass_only_when_asked(setup):
    tok, _, policy, examples = setup
    collator = Collator(tok.pad_token_id)
    batch = collator(examples)
    plain = sequence_logps(policy, batch, 5)
    assert set(plain) == {"logps", "lengths", "mean_logps"}  # the default path: nothing extra
    with_sq = sequence_logps(policy, batch, 5, sq_mass=True)
    unchunked = sequence_logps(policy, batch, 0, sq_mass=True)
    assert not with_sq["sq_mass"].requires_grad
    torch.testing.assert_close(with_sq["sq_mass"], unchunked["sq_mass"], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(with_sq["logps"], plain["logps"])
