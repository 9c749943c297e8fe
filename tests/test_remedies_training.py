"""The trainer side of issue 16's losses on the tiny model: a loss state kept across steps and
checkpoints (β-DPO), a token subset drawn per pair (SamPO) and a reference that moves during
training (TR-DPO), each checked against a direct computation with plain torch."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_loss_training import PAIRS, direct, make_cfg  # tests/ is on sys.path (rootdir conftest)
from transformers import TrainerCallback, TrainingArguments

from prefopt import config, losses
from prefopt.cli import main
from prefopt.data import collate
from prefopt.data.collate import Collator
from prefopt.data.formats import load_pairs
from prefopt.data.tokenize import tokenize_pairs
from prefopt.errors import PrefoptError
from prefopt.evaluation import reward_model
from prefopt.evaluation.trained import load_trained
from prefopt.modeling import load, reference
from prefopt.modeling.logprobs import sequence_logps
from prefopt.recipes import train as train_mod
from prefopt.training import setup as training_setup
from prefopt.training.trainer import LOSS_STATE_FILE, REFERENCE_FILE, PreferenceTrainer


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("remedies") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS))
    return str(path)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return load.load_tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def examples(tok, data_file) -> list[dict]:
    pairs, _ = load_pairs(data_file)
    examples, _ = tokenize_pairs(pairs, tok, max_length=64, max_prompt_length=32)
    assert any(len(e["chosen_ids"]) != len(e["rejected_ids"]) for e in examples)
    return examples


@pytest.fixture(scope="module")
def models(tiny_dir):
    """(reference, policy = a perturbed copy), float32, eval mode."""
    ref_model = load.load_model(tiny_dir, dtype="float32").eval()
    policy = copy.deepcopy(ref_model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return ref_model, policy


def subset_sums(model, examples, subset: str, seed: int) -> torch.Tensor:
    """Σ of the per-token log-probs at each response's subset positions, from one plain forward per
    response (`direct`), in the engine's order (chosen, rejected of each example)."""
    out = []
    for ex in examples:
        for response, mask in zip((ex["chosen_ids"], ex["rejected_ids"]), collate.subset_masks(ex, subset, seed)):
            tok_logps, _ = direct(model, ex["prompt_ids"], response)
            out.append(tok_logps[torch.tensor(mask)].sum())
    return torch.stack(out)


def whole_sums(model, examples) -> torch.Tensor:
    return torch.stack([direct(model, ex["prompt_ids"], r)[0].sum() for ex in examples for r in responses(ex)])


def responses(ex):
    return ex["chosen_ids"], ex["rejected_ids"]


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# --------------------------------------------------------------------------------------------
# SamPO: a token subset drawn per pair
# --------------------------------------------------------------------------------------------


def flags_per_sequence(batch: dict) -> dict[int, list[bool]]:
    """{sequence: its tokens' subset flags, in order} from a collated batch."""
    out: dict = {}
    for seq, flag in zip(batch["score_seq"].tolist(), batch["score_subset"].tolist()):
        out.setdefault(seq, []).append(flag)
    return out


def test_sample_subset_is_sampo_positions_seeded_per_pair(examples, tok):
    for ex in examples:
        n_c, n_r = len(ex["chosen_ids"]), len(ex["rejected_ids"])
        seed = collate.pair_seed(ex, 3)
        assert 0 <= seed < 2**63 and seed == collate.pair_seed(copy.deepcopy(ex), 3)
        kept_c, kept_r = losses.sampo_positions(n_c, n_r, seed)
        mask_c, mask_r = collate.subset_masks(ex, "sample", 3)
        assert [i for i, m in enumerate(mask_c) if m] == list(kept_c)
        assert [i for i, m in enumerate(mask_r) if m] == list(kept_r)
        assert sum(mask_c) == sum(mask_r) == min(n_c, n_r)  # T_m of each; the shorter keeps all
        assert all(mask_c if n_c <= n_r else mask_r)
    # another training seed draws another sample; the prefix subset does not depend on it
    assert any(collate.subset_masks(ex, "sample", 3) != collate.subset_masks(ex, "sample", 4) for ex in examples)
    assert all(collate.subset_masks(ex, "prefix", 3) == collate.subset_masks(ex, "prefix", 4) for ex in examples)


@pytest.mark.parametrize("prefix_sharing", [True, False])
def test_sample_subset_is_the_same_in_every_collation(examples, tok, prefix_sharing):
    """Two collations give the same batch; in any batch composition, order and layout each
    sequence carries its pair's own mask (so every epoch, a resume and every DDP rank agree)."""
    collator = Collator(tok.pad_token_id, prefix_sharing=prefix_sharing, subset="sample", seed=3)
    one, two = collator(examples), collator(copy.deepcopy(examples))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    for order in (examples, examples[::-1], examples[2:5]):
        flags = flags_per_sequence(collator(order))
        for i, ex in enumerate(order):
            assert [flags[2 * i], flags[2 * i + 1]] == collate.subset_masks(ex, "sample", 3)


@pytest.mark.parametrize("prefix_sharing, chunk", [(True, 0), (True, 5), (False, 1024)])
def test_engine_subset_sums_equal_direct_per_token_sums(examples, tok, models, prefix_sharing, chunk):
    _, policy = models
    collator = Collator(tok.pad_token_id, prefix_sharing=prefix_sharing, subset="sample", seed=11)
    with torch.no_grad():
        out = sequence_logps(policy, collator(examples), chunk)
    expected = subset_sums(policy, examples, "sample", 11)
    torch.testing.assert_close(out["subset_logps"], expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out["logps"], whole_sums(policy, examples), atol=1e-4, rtol=1e-5)
    assert not torch.allclose(out["subset_logps"], out["logps"], atol=1e-2)  # a real subset


def test_precompute_and_training_use_the_same_positions(examples, tok, models, tmp_path, caplog):
    ref_model, policy = models
    collator = Collator(tok.pad_token_id, subset="sample", seed=5)
    kw = dict(cache_dir=tmp_path / "cache", batch_size=3, chunk=1024, autocast_dtype=None, progress=False)
    precomputed = copy.deepcopy(examples)
    reference.precompute(ref_model, precomputed, collator, **kw)  # batches of 3 in order of length
    expected = subset_sums(ref_model, examples, "sample", 5).view(-1, 2)
    stored = torch.tensor([ex["ref_subset_logps"] for ex in precomputed], dtype=torch.float32)
    torch.testing.assert_close(stored, expected, atol=1e-4, rtol=1e-5)
    # a training batch of another composition carries those values; on the fly they come out the same
    batch = collator(precomputed[::-1][:4])
    stored = reference.outputs(policy, batch)["subset_logps"]
    fresh = reference.outputs(policy, batch, ref_model, precomputed=False)["subset_logps"]
    torch.testing.assert_close(stored, fresh.float(), atol=1e-4, rtol=1e-5)
    again = copy.deepcopy(examples)
    with caplog.at_level("INFO", logger="prefopt"):
        reference.precompute(ref_model, again, collator, **kw)
    assert "reusing" in caplog.text and [ex["ref_subset_logps"] for ex in again] == [
        ex["ref_subset_logps"] for ex in precomputed
    ]


def test_cache_keys_of_the_subsets(examples, tok, models, tmp_path):
    ref_model, _ = models

    def key(collator):
        return reference._cache_path(ref_model, examples, collator, tmp_path, None, 1024).name

    plain = key(Collator(tok.pad_token_id))
    # without a subset the key is that of earlier versions: their cache files stay valid
    old = reference.data_fingerprint(examples, f"{reference.weights_fingerprint(ref_model)}|True|None|1024")
    assert plain == f"{old}.safetensors"
    keys = {
        plain,
        key(Collator(tok.pad_token_id, subset="prefix", seed=0)),
        key(Collator(tok.pad_token_id, subset="sample", seed=0)),
        key(Collator(tok.pad_token_id, subset="sample", seed=1)),
    }
    assert len(keys) == 4  # the sample's seed is in its key; the prefix has none
    assert key(Collator(tok.pad_token_id, subset="prefix", seed=1)) in keys


def sampo_trainer(tiny_dir, data_file, tmp_path, models, examples, tok, loss: dict):
    ref_model, policy = models
    cfg = make_cfg(tiny_dir, data_file, tmp_path, loss)
    collator = training_setup.make_collator(cfg, tok)
    examples = copy.deepcopy(examples)
    kw = dict(cache_dir=tmp_path / "cache", batch_size=4, chunk=1024, autocast_dtype=None, progress=False)
    reference.precompute(ref_model, examples, collator, **kw)
    spec = config.resolve_loss(cfg.loss)
    trainer = training_setup.make_trainer(cfg, spec, policy, tok, collator, examples, [], bf16=False)
    return trainer, collator(examples), cfg


def test_sampo_loss_sees_the_subset_sums_of_policy_and_reference(tiny_dir, data_file, tmp_path, models, examples, tok):
    ref_model, policy = models
    trainer, batch, cfg = sampo_trainer(tiny_dir, data_file, tmp_path, models, examples, tok, {"name": "sampo"})
    assert trainer.data_collator.subset == "sample" and trainer.data_collator.seed == cfg.train.seed
    with torch.no_grad():
        loss, out = trainer.compute_loss(policy, batch, return_outputs=True)
    pol = subset_sums(policy, examples, "sample", cfg.train.seed)
    ref = subset_sums(ref_model, examples, "sample", cfg.train.seed)
    torch.testing.assert_close(out["loss_logps"], pol, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(out["loss_ref_logps"], ref, atol=1e-3, rtol=1e-5)
    expected = losses.sampo(pol[0::2], pol[1::2], ref[0::2], ref[1::2], beta=0.1).mean()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_sampo_with_ld_alpha_is_refused(tiny_dir, tok):
    with pytest.raises(PrefoptError, match=r"'loss.ld_alpha' \(LD-DPO's shared-length prefix\) and loss 'sampo'"):
        config.from_dict({"loss": {"name": "sampo", "ld_alpha": 0.5}})
    model = load.load_model(tiny_dir, dtype="float32")
    with pytest.raises(PrefoptError, match="ld_alpha .* and loss 'sampo', which scores its own token subset"):
        PreferenceTrainer(model, loss="sampo", ld_alpha=0.5, processing_class=tok)


def test_eval_of_a_sampo_run_uses_whole_responses(tiny_dir, data_file, tmp_path, examples):
    cfg = make_cfg(tiny_dir, data_file, tmp_path, {"name": "sampo"})
    train_mod.train(cfg)
    trained = load_trained(cfg.train.output_dir)
    logps, ref_logps, lengths = reward_model._logps_of(trained, examples)
    torch.testing.assert_close(logps.reshape(-1), whole_sums(trained.model, examples).double(), atol=1e-3, rtol=1e-5)
    counts = [float(len(r)) for ex in examples for r in responses(ex)]
    torch.testing.assert_close(lengths.reshape(-1), torch.tensor(counts, dtype=lengths.dtype))


# --------------------------------------------------------------------------------------------
# β-DPO: a loss state kept across steps, evaluations and checkpoints
# --------------------------------------------------------------------------------------------


def test_evaluation_does_not_advance_the_loss_state(tiny_dir, data_file, tmp_path, models, examples, tok):
    trainer, batch, _ = sampo_trainer(tiny_dir, data_file, tmp_path, models, examples, tok, {"name": "beta_dpo"})
    policy = models[1]
    assert isinstance(trainer.loss_state, losses.BetaDPOState) and trainer.loss_state.gather is None  # one process
    before, rng = trainer.loss_state.to_dict(), torch.get_rng_state()
    with torch.no_grad():
        trainer.compute_loss(policy, batch)  # eval mode (the fixture's models are in eval mode)
    assert trainer.loss_state.to_dict() == before
    assert torch.equal(torch.get_rng_state(), rng)  # every pair kept in evaluation: no random draw
    policy.train()
    try:
        with torch.no_grad():
            trainer.compute_loss(policy, batch)
    finally:
        policy.eval()
    assert trainer.loss_state.count == before["count"] + 1


def test_a_bco_state_saved_by_earlier_versions_is_restored(tiny_dir, data_file, tmp_path, models, examples, tok):
    trainer, _, _ = sampo_trainer(tiny_dir, data_file, tmp_path, models, examples, tok, {"name": "bco_pair"})
    (tmp_path / LOSS_STATE_FILE).write_text(json.dumps({"mean": 0.25, "count": 12}))
    trainer.restore_state(tmp_path)
    assert (trainer.loss_state.mean, trainer.loss_state.count) == (0.25, 12)


@pytest.fixture()
def run_config(tmp_path, tiny_dir):
    """A config of 8 steps (16 pairs, 2 per step) checkpointed every 4."""
    data = tmp_path / "pairs16.jsonl"
    rows = [
        {"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f" {2 * i}.", "rejected": f" Maybe {i + 1}?"}
        for i in range(16)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def make(out: Path, loss: dict, lora: bool = False) -> config.Config:
        return config.from_dict(
            {
                "model": {"name": tiny_dir},
                "lora": {"enabled": lora, "r": 4},
                "data": {"train": str(data), "max_length": 64, "max_prompt_length": 32},
                "loss": loss,
                "reference": {"cache_dir": str(tmp_path / "ref-cache")},
                "train": {
                    "output_dir": str(out),
                    "epochs": 1.0,
                    "batch_size": 2,
                    "lr": 5e-2 if lora else 1e-2,
                    "warmup_ratio": 0.0,
                    "progress": False,
                    "seed": 0,
                    "bf16": False,
                    "save_steps": 4,
                    "save_total_limit": 0,
                },
            }
        )

    return make


WEIGHTS = {False: "model.safetensors", True: "adapter_model.safetensors"}


def kill_after_checkpoint_4(out: Path, lora: bool = False) -> None:
    """What a kill after checkpoint-4 leaves: no checkpoint-8, no final model."""
    shutil.rmtree(out / "checkpoint-8")
    (out / WEIGHTS[lora]).unlink()


def test_beta_dpo_resumed_equals_uninterrupted(run_config, tmp_path, monkeypatch):
    """β-DPO's running margin statistics are part of the checkpoint: resumed from step 4 of 8, the
    run ends with the uninterrupted run's weights; with the state not restored it would not."""
    out = tmp_path / "beta"
    cfg = run_config(out, {"name": "beta_dpo"})
    train_mod.train(cfg)
    uninterrupted = load_file(str(out / "model.safetensors"))
    state = json.loads((out / "checkpoint-4" / LOSS_STATE_FILE).read_text())
    assert state["count"] == 4 and state["mean"] != 0 and state["std"] > 0

    kill_after_checkpoint_4(out)
    assert train_mod.train(cfg, resume=True)["resumed_from"].endswith("checkpoint-4")
    assert max_abs_diff(uninterrupted, load_file(str(out / "model.safetensors"))) <= 1e-6

    kill_after_checkpoint_4(out)  # the same resume, the state left fresh: another run
    monkeypatch.setattr(losses.BetaDPOState, "load_dict", lambda self, d: None)
    train_mod.train(cfg, resume=True)
    assert max_abs_diff(uninterrupted, load_file(str(out / "model.safetensors"))) > 1e-5


# --------------------------------------------------------------------------------------------
# TR-DPO: a moving reference
# --------------------------------------------------------------------------------------------


class Recorder(TrainerCallback):
    """After each optimizer step (and after the trainer's own reference update): the reference's
    weights, the policy's effective (merged) weights and the reference's log-probs of `batch`."""

    def __init__(self, trainer, batch):
        self.trainer, self.batch = trainer, batch
        self.ref, self.policy, self.ref_logps = [], [], []

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        self.ref.append({k: v.detach().clone() for k, v in t.ref_model.state_dict().items()})
        merged = copy.deepcopy(t.model).merge_and_unload() if hasattr(t.model, "merge_and_unload") else t.model
        self.policy.append({k: v.detach().clone() for k, v in merged.state_dict().items()})
        with torch.no_grad():
            self.ref_logps.append(sequence_logps(t.ref_model, self.batch)["logps"])


def tr_trainer(tiny_dir, tok, examples, tmp_path, *, lora: bool, tau: int, alpha: float, steps: int):
    model = load.load_model(tiny_dir, dtype="float32")
    if lora:
        model = load.add_lora(model, config.LoraConfig(enabled=True, r=4))
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=5e-2,
        lr_scheduler_type="constant",
        report_to="none",
        save_strategy="no",
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
    )
    loss_kwargs = {"tr_tau": tau, "tr_alpha": alpha}
    return PreferenceTrainer(
        model, args, loss="tr_dpo", loss_kwargs=loss_kwargs, train_dataset=copy.deepcopy(examples), processing_class=tok
    )


def hand_logps(tiny_dir, weights: dict, batch) -> torch.Tensor:
    """Log-probs of `batch` under a fresh tiny model given `weights`."""
    model = load.load_model(tiny_dir, dtype="float32").eval()
    model.load_state_dict(weights)
    with torch.no_grad():
        return sequence_logps(model, batch)["logps"]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_reference_moves_by_the_soft_update_every_tau_steps(tiny_dir, tok, examples, tmp_path, lora):
    alpha, tau = 0.3, 2
    trainer = tr_trainer(tiny_dir, tok, examples, tmp_path, lora=lora, tau=tau, alpha=alpha, steps=4)
    batch = trainer.data_collator(examples[:4])
    start = {k: v.detach().clone() for k, v in trainer.ref_model.state_dict().items()}
    base = load.load_model(tiny_dir, dtype="float32").state_dict()
    assert max_abs_diff(start, base) == 0  # the reference starts as the model before training
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    if lora:  # only the LoRA-targeted weights can move
        names = trainer.moving_reference.names
        assert names and all(n.endswith("_proj.weight") for n in names)
    recorder = Recorder(trainer, batch)
    trainer.add_callback(recorder)
    trainer.train()

    previous = start
    for step in range(1, 5):
        ref, policy = recorder.ref[step - 1], recorder.policy[step - 1]
        if step % tau:  # not the τ-th step: unchanged, bit for bit
            assert max_abs_diff(ref, previous) == 0, step
        else:  # W_ref = α·W_π + (1 − α)·W_ref, by hand, for every weight
            hand = {k: alpha * policy[k] + (1 - alpha) * previous[k] for k in previous}
            assert max_abs_diff(ref, hand) <= 1e-6, step
            logps = hand_logps(tiny_dir, hand, batch)
            torch.testing.assert_close(recorder.ref_logps[step - 1], logps, atol=1e-4, rtol=1e-5)
            assert (recorder.ref_logps[step - 1] - recorder.ref_logps[step - 2]).abs().max() > 1e-3  # it moved
        previous = ref
    if lora:  # weights outside the adapters stay the base model's
        assert torch.equal(previous["model.embed_tokens.weight"], start["model.embed_tokens.weight"])


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_tr_dpo_resumed_equals_uninterrupted(run_config, tmp_path, tiny_dir, lora):
    """The moving reference's weights are part of the checkpoint (updated at steps 3 and 6; the
    checkpoints are at 4 and 8): resumed from step 4, the final weights and the reference equal
    the uninterrupted run's."""
    out = tmp_path / "tr"
    cfg = run_config(out, {"name": "tr_dpo", "tr_tau": 3, "tr_alpha": 0.5}, lora=lora)
    assert cfg.reference.precompute is False
    train_mod.train(cfg)
    uninterrupted = load_file(str(out / WEIGHTS[lora]))
    ref_8 = load_file(str(out / "checkpoint-8" / REFERENCE_FILE))
    ref_4 = load_file(str(out / "checkpoint-4" / REFERENCE_FILE))
    base = load.load_model(tiny_dir, dtype="float32").state_dict()
    assert max_abs_diff(ref_4, {k: base[k] for k in ref_4}) > 1e-4  # moved at step 3
    assert max_abs_diff(ref_8, ref_4) > 1e-4  # and again at step 6
    if lora:  # only the targeted weights are saved
        assert ref_4 and all(k.endswith("_proj.weight") for k in ref_4)
    else:
        assert "model.embed_tokens.weight" in ref_4

    kill_after_checkpoint_4(out, lora)
    assert train_mod.train(cfg, resume=True)["resumed_from"].endswith("checkpoint-4")
    assert max_abs_diff(uninterrupted, load_file(str(out / WEIGHTS[lora]))) <= 1e-6
    assert max_abs_diff(ref_8, load_file(str(out / "checkpoint-8" / REFERENCE_FILE))) <= 1e-6


PRECOMPUTE_ERROR = (
    "'reference.precompute' is true, but loss 'tr_dpo' moves its reference during training (every tr_tau "
    "optimizer steps the reference's weights move towards the policy's), so reference log-probs cannot be "
    "computed before training; set reference.precompute: false, or leave it out (for this loss it defaults to "
    "false)."
)


def test_tr_dpo_never_precomputes(tiny_dir, tok, tmp_path, capsys):
    assert config.from_dict({"loss": {"name": "tr_dpo"}}).reference.precompute is False
    assert config.from_dict({"loss": {"name": "sigmoid"}}).reference.precompute is True
    assert config.from_dict({"loss": {"name": "tr_dpo"}, "reference": {"precompute": False}}).loss.name == "tr_dpo"
    for key in ("precompute", "precompute_ref_log_probs"):
        with pytest.raises(PrefoptError) as e:
            config.from_dict({"loss": {"name": "tr_dpo"}, "reference": {key: True}}, "cfg.yaml")
        assert str(e.value) == f"cfg.yaml: {PRECOMPUTE_ERROR}"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("loss:\n  name: tr_dpo\nreference:\n  precompute: true\n")
    assert main(["train", str(cfg)]) == 2
    assert f"prefopt: error: {cfg}: {PRECOMPUTE_ERROR}" in capsys.readouterr().err
    model = load.load_model(tiny_dir, dtype="float32")
    with pytest.raises(PrefoptError, match=r"precompute_reference is true, but loss 'tr_dpo' moves its reference"):
        PreferenceTrainer(model, loss="tr_dpo", precompute_reference=True, processing_class=tok)


def test_tr_dpo_trains_from_python_without_precompute(tiny_dir, tok, examples, tmp_path, monkeypatch):
    """PreferenceTrainer(loss="tr_dpo") copies the policy itself and never precomputes, even for
    examples that carry precomputed values."""
    monkeypatch.setattr(reference, "precompute", lambda *a, **k: pytest.fail("precomputed"))
    carrying = [dict(ex, ref_logps=[0.0, 0.0]) for ex in examples]
    trainer = tr_trainer(tiny_dir, tok, carrying, tmp_path, lora=False, tau=1, alpha=1.0, steps=1)
    batch = trainer.data_collator(carrying[:2])
    with torch.no_grad():
        _, out = trainer.compute_loss(trainer.model.eval(), batch, return_outputs=True)
    torch.testing.assert_close(out["loss_ref_logps"], out["logps"].detach(), atol=1e-5, rtol=1e-5)  # π_ref = π


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_frozen_copy_is_independent_of_the_policy(tiny_dir, tok, examples, lora):
    """A frozen copy of a policy whose MLPs are checkpointed (train.gradient_checkpointing: mlp)
    computes with its own weights, not the policy's, and a LoRA policy's copy has no adapter."""
    from prefopt.modeling.checkpointing import checkpoint_mlps

    policy = load.load_model(tiny_dir, dtype="float32")
    if lora:
        policy = load.add_lora(policy, config.LoraConfig(enabled=True, r=4))
    assert checkpoint_mlps(policy) > 0
    batch = Collator(tok.pad_token_id)(examples[:4])
    frozen = reference.frozen_copy(policy)
    assert not hasattr(frozen, "disable_adapter") and not any(p.requires_grad for p in frozen.parameters())
    with torch.no_grad():
        before = sequence_logps(frozen, batch)["logps"]
        for name, p in policy.named_parameters():
            if "mlp" in name:
                p.add_(0.5)
        after = sequence_logps(frozen, batch)["logps"]
        moved = sequence_logps(policy, batch)["logps"]
    assert torch.equal(before, after) and (moved - before).abs().max() > 1e-2


def test_tr_dpo_under_ddp_equals_one_process(tmp_path, tiny_dir):
    """Two DDP processes, each moving its own copy of the reference (every 2 steps), log the
    reference log-probs and reach the weights of one process with the same global batch."""
    from test_distributed import PAIRS as PAIRS16
    from test_distributed import base_config, in_process, same_run, torchrun

    loss = {"name": "tr_dpo", "tr_tau": 2, "tr_alpha": 0.5}
    keys = ("loss", "grad_norm", "rewards/margins", "logps/ref_chosen", "logps/ref_rejected")
    ddp = torchrun(tmp_path, {**base_config(tmp_path, tiny_dir, PAIRS16, "tr-ddp", batch_size=2), "loss": loss}, 2)
    one = in_process({**base_config(tmp_path, tiny_dir, PAIRS16, "tr-one", batch_size=4), "loss": loss})
    same_run(one, ddp, keys)  # steps 3 and 4 score against the reference moved at step 2


def test_losses_that_cannot_be_summed_are_a_config_error():
    for weights in ({"bco_pair": 1.0, "beta_dpo": 1.0}, {"sigmoid": 1.0, "sampo": 1.0}):
        with pytest.raises(PrefoptError, match=r"cfg.yaml: 'loss.weights' combine: "):
            config.from_dict({"loss": {"name": "combine", "weights": weights}}, "cfg.yaml")
