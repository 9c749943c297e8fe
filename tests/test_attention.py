"""Segment attention (prefopt.modeling.attention) against the dense-mask path and against plain
separate forwards of [prompt + response]: log-probs and gradients, for pairs, unpaired examples
(with and without KL completions), several examples per row, padding, with and without prefix
sharing, LoRA and activation checkpointing; and no tensor of T² elements in a forward at T = 2048.
"""

from __future__ import annotations

import random

import pytest
import torch
from test_lora_reference import perturb_adapter  # tests/ is on sys.path (rootdir conftest)
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import MistralConfig, MistralForCausalLM

from prefopt import config
from prefopt.config import LoraConfig
from prefopt.data.collate import Collator, responses_of
from prefopt.errors import PrefoptError
from prefopt.modeling import attention, logprobs, reference
from prefopt.modeling.checkpointing import checkpoint_mlps
from prefopt.modeling.load import add_lora, load_model
from prefopt.modeling.logprobs import sequence_logps, set_attention
from prefopt.training.setup import build_model


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return load_model(tiny_dir, dtype="float32").eval()


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 49152) for _ in range(n)]


# (prompt, response lengths): very different lengths in one batch, a 1-token prompt and response
SHAPES = [(1, (30, 1)), (40, (1, 30)), (7, (5, 12)), (25, (20, 19)), (1, (1, 1))]


def make_examples(kind: str, seed: int = 0, n: int = 5) -> list[dict]:
    """`n` examples: pairs, unpaired (K = 1) or unpaired with a KL completion (K = 2)."""
    rng = random.Random(seed)
    out = []
    for i, (p, (a, b)) in enumerate(SHAPES[:n]):
        ex = {"prompt_ids": _ids(rng, p)}
        if kind == "paired":
            ex.update(chosen_ids=_ids(rng, a), rejected_ids=_ids(rng, b))
        else:
            ex.update(completion_ids=_ids(rng, a), label=i % 2 == 0)
            if kind == "kl":
                ex["kl_completion_ids"] = _ids(rng, b)
        out.append(ex)
    return out


def direct_logps(model, examples) -> torch.Tensor:
    """Each response's summed log-prob from its own plain forward of [prompt + response]."""
    out = []
    for ex in examples:
        prompt = ex["prompt_ids"]
        for response in responses_of(ex):
            logp = model(torch.tensor([prompt + response])).logits[0].float().log_softmax(-1)
            pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(response))
            out.append(logp[pos, torch.tensor(response)].sum())
    return torch.stack(out)


def packed_batch(rows: list[list[dict]], pad: int = 2, gap: int = 0, extra: int = 3) -> dict:
    """Several examples per row: each example's [prompt | response 1 | … | response K] after the
    previous one (`gap` padding tokens between examples), padding to the widest row + `extra`.
    Sequence numbering as the collator's: example i's response k is sequence i·K + k − 1."""
    K = len(responses_of(rows[0][0]))
    width = max(sum(len(ex["prompt_ids"]) + sum(map(len, responses_of(ex))) + gap for ex in row) for row in rows)
    width += extra
    R = len(rows)
    b = {
        "input_ids": torch.full((R, width), pad),
        "position_ids": torch.arange(width).repeat(R, 1),  # padding: own positions (the dense path needs them)
        "doc_ids": torch.full((R, width), -1),
        "branch_ids": torch.zeros((R, width), dtype=torch.long),
    }
    src, tgt, seq = [], [], []
    i = 0
    for r, row in enumerate(rows):
        t = 0
        for ex in row:
            prompt, p0 = ex["prompt_ids"], t
            for branch, ids in enumerate([prompt] + responses_of(ex)):
                n = len(ids)
                b["input_ids"][r, t : t + n] = torch.tensor(ids)
                b["doc_ids"][r, t : t + n] = i
                b["branch_ids"][r, t : t + n] = branch
                first = 0 if branch == 0 else len(prompt)
                b["position_ids"][r, t : t + n] = torch.arange(first, first + n)
                if branch:
                    src += [r * width + p0 + len(prompt) - 1] + list(range(r * width + t, r * width + t + n - 1))
                    tgt += ids
                    seq += [i * K + branch - 1] * n
                t += n
            t += gap
            i += 1
    b.update(score_src=torch.tensor(src), score_tgt=torch.tensor(tgt), score_seq=torch.tensor(seq))
    b["n_seqs"] = torch.tensor(i * K)
    return b


def logps_by(model, batch, path: str, chunk: int = 3, **kw) -> torch.Tensor:
    set_attention(model, path)
    return sequence_logps(model, batch, chunk, **kw)["logps"]


def batches(kind: str, seed: int = 0):
    """(name, examples in sequence order, batch) for each layout of `kind`'s examples."""
    examples = make_examples(kind, seed)
    yield "prefix sharing", examples, Collator(2, prefix_sharing=True)(examples)
    yield "separate rows", examples, Collator(2, prefix_sharing=False)(examples)
    yield "padded to 64", examples, Collator(2, pad_to_multiple_of=64)(examples)
    rows = [examples[:2], examples[2:3], examples[3:]]
    yield "several per row", examples, packed_batch(rows)
    yield "several per row, gaps", examples, packed_batch(rows, gap=2)


@pytest.mark.parametrize("kind", ["paired", "unpaired", "kl"])
def test_logps_match_dense_and_direct(tiny_model, kind):
    with torch.no_grad():
        expected = direct_logps(tiny_model, make_examples(kind))
        for name, _, batch in batches(kind):
            segments = logps_by(tiny_model, batch, "segments")
            dense = logps_by(tiny_model, batch, "dense")
            assert segments.shape == expected.shape, name
            torch.testing.assert_close(segments, dense, atol=1e-4, rtol=0, msg=name)
            torch.testing.assert_close(segments, expected, atol=1e-4, rtol=0, msg=name)
    assert tiny_model.config._attn_implementation == attention.NAME


def test_subset_and_sq_mass_outputs_match_dense(tiny_model):
    """The engine's other per-sequence outputs (a token subset's sum, WPO's squared mass) too."""
    examples = make_examples("paired", seed=4)
    batch = Collator(2, subset="prefix")(examples)
    with torch.no_grad():
        set_attention(tiny_model, "segments")
        seg = sequence_logps(tiny_model, batch, 3, sq_mass=True)
        set_attention(tiny_model, "dense")
        dense = sequence_logps(tiny_model, batch, 3, sq_mass=True)
    for key in ("logps", "subset_logps", "sq_mass"):
        torch.testing.assert_close(seg[key], dense[key], atol=1e-4, rtol=0, msg=key)


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def weighted_grads(model, logps_fn, *args) -> dict:
    """Gradients of Σ_s w_s·logp_s, logp = logps_fn(*args), the weights all different (a swapped
    sequence changes them)."""
    model.zero_grad()
    logps = logps_fn(*args)
    (logps * torch.linspace(0.5, 2.0, len(logps))).sum().backward()
    return _grads(model)


def assert_grads_close(got: dict, expected: dict, what: str) -> float:
    """float32 sums in different orders: elementwise rtol 1e-4 with an absolute floor of 1e-4 of the
    tensor's largest entry, and relative norm < 1e-4. Returns the largest relative norm."""
    assert got.keys() == expected.keys() and expected, what
    worst = 0.0
    for name, e in expected.items():
        g = got[name]
        scale = e.abs().max().item()
        assert scale > 0, (what, name)
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4 * scale, msg=f"{what}: {name}")
        worst = max(worst, ((g - e).norm() / e.norm()).item())
    assert worst < 1e-4, (what, worst)
    return worst


def _checkpointed(model, how: str):
    """`model` with prefopt's activation checkpointing: whole layers (train.gradient_checkpointing:
    true, what transformers' Trainer switches on) or only MLPs (mlp)."""
    if how == "layers":
        model.activation_checkpointing_enable()
    elif how == "mlp":
        assert checkpoint_mlps(model) > 0
    return model


@pytest.mark.parametrize(
    "kind,checkpointing",
    [("paired", "none"), ("paired", "layers"), ("paired", "mlp"), ("unpaired", "layers"), ("kl", "none")],
)
def test_gradients_match_dense_and_direct(tiny_dir, kind, checkpointing):
    model = _checkpointed(load_model(tiny_dir, dtype="float32"), checkpointing).train()
    direct = weighted_grads(model, direct_logps, model, make_examples(kind, seed=5))
    for name, _, batch in batches(kind, seed=5):
        seg = weighted_grads(model, logps_by, model, batch, "segments")
        dense = weighted_grads(model, logps_by, model, batch, "dense")
        assert_grads_close(seg, dense, f"{name}: segments vs dense")
        assert_grads_close(seg, direct, f"{name}: segments vs direct")


@pytest.mark.parametrize("checkpointing", ["none", "layers"])
def test_lora_gradients_and_reference_match(tiny_dir, checkpointing):
    """LoRA: the adapter's gradients, and the reference (adapter off), both ways."""
    model = add_lora(_checkpointed(load_model(tiny_dir, dtype="float32"), checkpointing), LoraConfig())
    assert perturb_adapter(model) > 0
    model.train()
    examples = make_examples("paired", seed=6)
    direct = weighted_grads(model, direct_logps, model, examples)
    assert direct and all("lora_" in k for k in direct)
    for name, _, batch in batches("paired", seed=6):
        seg = weighted_grads(model, logps_by, model, batch, "segments")
        assert_grads_close(seg, weighted_grads(model, logps_by, model, batch, "dense"), name)
        assert_grads_close(seg, direct, name)
        with torch.no_grad(), model.disable_adapter():
            ref_seg, ref_dense = logps_by(model, batch, "segments"), logps_by(model, batch, "dense")
            ref_direct = direct_logps(model, examples)
        torch.testing.assert_close(ref_seg, ref_dense, atol=1e-4, rtol=0)
        torch.testing.assert_close(ref_seg, ref_direct, atol=1e-4, rtol=0)


def test_bf16_autocast_close_to_dense(tiny_model):
    """Under bf16 autocast both paths round differently; they stay as close to each other as each
    is to the float32 values."""
    examples = make_examples("paired", seed=7)
    batch = Collator(2)(examples)
    with torch.no_grad():
        exact = logps_by(tiny_model, batch, "dense")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            seg, dense = logps_by(tiny_model, batch, "segments"), logps_by(tiny_model, batch, "dense")
    bound = 2 * max((dense - exact).abs().max().item(), 1e-3)
    assert (seg - dense).abs().max().item() <= bound
    assert (seg - exact).abs().max().item() <= bound


def test_plain_forwards_are_sdpa_after_the_switch(tiny_dir):
    """A switched model is sdpa for every forward without a layout: a plain forward, a left-padded
    batch with its 2D mask, and generation from it."""
    model = load_model(tiny_dir, dtype="float32").eval()
    set_attention(model, "segments")
    ids = torch.tensor([[2, 2, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits, model(ids[1:]).logits
        sequence_logps(model, Collator(2)(make_examples("paired")), 0)
        assert model.config._attn_implementation == attention.NAME
        after = model(ids, attention_mask=mask).logits, model(ids[1:]).logits
    torch.testing.assert_close(after[0][0, 2:], before[0][0, 2:], atol=0, rtol=0)
    torch.testing.assert_close(after[0][1], before[0][1], atol=0, rtol=0)
    torch.testing.assert_close(after[1], before[1], atol=0, rtol=0)
    fresh = load_model(tiny_dir, dtype="float32").eval()
    greedy = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=2)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **greedy), fresh.generate(ids, **greedy))


def test_unsupported_attention_falls_back_to_dense(tmp_path, caplog):
    """A sliding window shorter than the rows (transformers then builds a mask of its own): the
    engine warns and takes the dense path for that model, with the dense path's values."""
    cfg = MistralConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=16,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    MistralForCausalLM(cfg).save_pretrained(tmp_path)
    model = load_model(str(tmp_path), dtype="float32").eval()
    batch = Collator(2)(make_examples("paired", n=3))
    set_attention(model, "segments")
    assert logprobs.attention_path(model) == "segments"
    with torch.no_grad(), caplog.at_level("WARNING", logger="prefopt"):
        first = sequence_logps(model, batch, 3)["logps"]
        assert logprobs.attention_path(model) == "dense"
        dense = logps_by(model, batch, "dense")
    assert "segment attention cannot compute this model's attention" in caplog.text
    assert "uses the dense attention mask" in caplog.text
    torch.testing.assert_close(first, dense, atol=0, rtol=0)


def test_model_that_drops_the_layout_falls_back_to_dense(tiny_dir, caplog):
    """Attention modules that do not hand the forward's keyword arguments on (as some remote-code
    models): the first attention call without the layout stops the forward, and the engine takes
    the dense path, not plain causal attention over the whole row."""
    model = load_model(tiny_dir, dtype="float32").eval()
    set_attention(model, "segments")
    for layer in model.model.layers:

        def forward(*args, _inner=layer.self_attn.forward, **kwargs):
            kwargs.pop(attention.KWARG, None)
            return _inner(*args, **kwargs)

        layer.self_attn.forward = forward
    examples = make_examples("paired", n=3)
    with torch.no_grad(), caplog.at_level("WARNING", logger="prefopt"):
        logps = sequence_logps(model, Collator(2)(examples), 3)["logps"]
        expected = direct_logps(model, examples)
    assert "does not pass its forward's arguments to its attention" in caplog.text
    assert logprobs.attention_path(model) == "dense"
    torch.testing.assert_close(logps, expected, atol=1e-4, rtol=0)


def test_path_choice(tiny_dir, tiny_model):
    """Auto by default: dense below SEGMENTS_FROM tokens per row, segments from there; segments or
    dense when set; eager (and other implementations) always dense."""
    model = load_model(tiny_dir, dtype="float32")
    assert logprobs.attention_setting(model) == "auto"
    assert logprobs.attention_path(model) == "dense"
    assert logprobs.attention_path(model, logprobs.SEGMENTS_FROM - 1) == "dense"
    assert logprobs.attention_path(model, logprobs.SEGMENTS_FROM) == "segments"
    set_attention(model, "segments")
    assert logprobs.attention_path(model) == "segments"
    set_attention(model, "dense")
    assert logprobs.attention_path(model, 4096) == "dense"
    set_attention(eager := load_model(tiny_dir, dtype="float32", attn_implementation="eager"), "segments")
    assert logprobs.attention_path(eager) == "dense"
    eager = load_model(tiny_dir, dtype="float32", attn_implementation="eager")
    assert logprobs.attention_setting(eager) == "dense"
    assert logprobs.attention_path(eager, 4096) == "dense"
    with pytest.raises(ValueError, match="attention path must be one of auto, segments, dense"):
        set_attention(model, "flash")
    with pytest.raises(ValueError, match="replaces sdpa"):
        attention.use_segments(eager)


def test_train_attention_key(tiny_dir):
    """train.attention: auto by default, segments or dense on request (the model built for training
    gets it), anything else refused naming the key."""
    assert config.from_dict({}).train.attention == "auto"
    for setting in ("segments", "dense", "auto"):
        cfg = config.from_dict({"train": {"attention": setting}})
        assert logprobs.attention_setting(build_model(cfg, tiny_dir)) == setting
    assert logprobs.attention_setting(build_model(config.from_dict({}), tiny_dir)) == "auto"
    with pytest.raises(PrefoptError, match="train.attention.*must be auto, segments or dense, found 'flash'"):
        config.from_dict({"train": {"attention": "flash"}}, "cfg.yaml")


def test_reference_cache_key_names_the_path_the_batches_take(tiny_dir, tmp_path):
    """The reference cache key of "auto" is the dense path's while no example reaches
    SEGMENTS_FROM tokens per row (auto is then the dense path), its own once one does; segments
    has its own."""
    model = load_model(tiny_dir, dtype="float32")
    rng = random.Random(3)
    short = [{"prompt_ids": _ids(rng, 30), "chosen_ids": _ids(rng, 9), "rejected_ids": _ids(rng, 7)}]
    n = logprobs.SEGMENTS_FROM // 2
    long = short + [{"prompt_ids": _ids(rng, n), "chosen_ids": _ids(rng, n // 2), "rejected_ids": _ids(rng, n // 2)}]
    collator = Collator(2)

    def keys(examples):
        out = {}
        for setting in ("auto", "dense", "segments"):
            set_attention(model, setting)
            out[setting] = reference._cache_path(model, examples, collator, tmp_path, None, 1024).name
        return out

    assert collator.width(short) < logprobs.SEGMENTS_FROM <= collator.width(long)
    k = keys(short)
    assert k["auto"] == k["dense"] != k["segments"]
    k = keys(long)
    assert len(set(k.values())) == 3


def test_layout_of_a_collated_batch_and_refusals():
    examples = make_examples("paired", n=2)
    lay = attention.layout(**{k: v for k, v in Collator(2)(examples).items() if k in ("doc_ids", "branch_ids")})
    assert lay.rows == (
        (attention.Example((0, 1), ((1, 30), (31, 1))),),
        (attention.Example((0, 40), ((40, 1), (41, 30))),),
    )
    assert not lay.simple and lay.width == 71
    sep = Collator(2, prefix_sharing=False)(examples)
    assert attention.layout(sep["doc_ids"], sep["branch_ids"]).simple
    doc = torch.tensor([[0, 0, 0, 0, -1]])
    with pytest.raises(ValueError, match="its prompt is not one run"):
        attention.layout(doc, torch.tensor([[0, 1, 0, 2, 0]]))
    with pytest.raises(ValueError, match="in pieces"):
        attention.layout(torch.tensor([[0, 0, 1, 0]]), torch.tensor([[0, 1, 0, 2]]))


class _LargestTensor(TorchDispatchMode):
    """Records the largest storage (in elements) any operation's output has: an allocation, or a
    view of one (a view of a small tensor has the small tensor's storage)."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                n = t.untyped_storage().nbytes() // t.element_size()
                if n > self.largest:
                    self.largest, self.op = n, str(func)
        return out


def test_no_t_squared_tensor_at_2048(tiny_dir):
    """Forward and backward at T = 2048: the default path (train.attention auto, which takes segment
    attention from SEGMENTS_FROM tokens) and segment attention allocate nothing of T² elements; the
    dense path does (its mask), so the check can fail. The lm-head chunk is 64 rows, so its logits
    (64 × vocabulary, a size that does not grow with T) stay under T² too on this model."""
    T = 2048
    model = load_model(tiny_dir, dtype="float32").train()
    rng = random.Random(8)
    examples = [
        {"prompt_ids": _ids(rng, 1024), "chosen_ids": _ids(rng, 512), "rejected_ids": _ids(rng, 512)},
        {"prompt_ids": _ids(rng, 300), "chosen_ids": _ids(rng, 200), "rejected_ids": _ids(rng, 100)},
    ]
    batch = Collator(2)(examples)
    assert batch["input_ids"].shape[1] == T
    assert logprobs.attention_setting(model) == config.from_dict({}).train.attention == "auto"
    largest = {}
    for path in ("default", "segments", "dense"):
        if path != "default":
            set_attention(model, path)
        model.zero_grad()
        with _LargestTensor() as seen:
            sequence_logps(model, batch, 64)["logps"].sum().backward()
        largest[path] = (seen.largest, seen.op)
    assert largest["default"][0] < T * T, largest
    assert largest["segments"][0] < T * T, largest
    assert largest["dense"][0] >= T * T, largest
