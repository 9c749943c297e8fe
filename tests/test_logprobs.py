"""prefopt.modeling.logprobs.sequence_logps against a direct one-sequence-at-a-time computation.

The engine packs [prompt | chosen | rejected] into one row with a custom attention mask, position
ids that restart for each response, and a chunked lm-head on scored positions only; the direct
computation runs the plain model on [prompt + response] alone and sums the response's log-probs.
"""

from __future__ import annotations

import random

import pytest
import torch

from prefopt.data.collate import Collator
from prefopt.modeling.load import load_model
from prefopt.modeling.logprobs import sequence_logps, set_attention


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    model = load_model(tiny_dir, dtype="float32")
    model.eval()
    return model


def _ids(rng: random.Random, n: int, vocab: int = 49152) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]  # avoid the special ids 0..2


def paired_examples(seed: int = 0) -> list[dict]:
    """Very different lengths in one batch: prompts of 1 and 40 tokens, responses of 1 and 30."""
    rng = random.Random(seed)
    shapes = [(1, 30, 1), (40, 1, 30), (7, 5, 12), (40, 30, 29), (1, 1, 1)]
    return [
        {"prompt_ids": _ids(rng, p), "chosen_ids": _ids(rng, c), "rejected_ids": _ids(rng, r)} for p, c, r in shapes
    ]


def unpaired_examples(seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    shapes = [(1, 30), (40, 1), (9, 13)]
    return [
        {"prompt_ids": _ids(rng, p), "completion_ids": _ids(rng, c), "label": i % 2 == 0}
        for i, (p, c) in enumerate(shapes)
    ]


def responses(ex: dict) -> list[list[int]]:
    return [ex["chosen_ids"], ex["rejected_ids"]] if "chosen_ids" in ex else [ex["completion_ids"]]


def direct_logp(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """Sum of log p(response_j | prompt, response_<j) from one plain forward of [prompt + response]."""
    ids = torch.tensor([prompt + response])
    logp = model(ids).logits[0].float().log_softmax(-1)
    pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(response))
    return logp[pos, torch.tensor(response)].sum()


def direct_logps(model, examples) -> torch.Tensor:
    return torch.stack([direct_logp(model, ex["prompt_ids"], r) for ex in examples for r in responses(ex)])


@pytest.mark.parametrize("prefix_sharing", [True, False])
@pytest.mark.parametrize("chunk", [0, 3])
@pytest.mark.parametrize("kind", ["paired", "unpaired"])
def test_logps_match_direct(tiny_model, tiny_dir, prefix_sharing, chunk, kind):
    examples = paired_examples() if kind == "paired" else unpaired_examples()
    batch = Collator(pad_token_id=2, prefix_sharing=prefix_sharing)(examples)
    with torch.no_grad():
        out = sequence_logps(tiny_model, batch, chunk)
        expected = direct_logps(tiny_model, examples)
    K = 2 if kind == "paired" else 1
    assert out["logps"].shape == (len(examples) * K,)
    torch.testing.assert_close(out["logps"], expected, atol=1e-4, rtol=0)
    lengths = torch.tensor([float(len(r)) for ex in examples for r in responses(ex)])
    torch.testing.assert_close(out["lengths"], lengths.to(out["lengths"].dtype))
    torch.testing.assert_close(out["mean_logps"], out["logps"] / lengths, atol=1e-5, rtol=0)


def test_eager_attention_float_mask(tiny_dir):
    """The eager path gets an additive float mask instead of a boolean one: same log-probs."""
    model = load_model(tiny_dir, dtype="float32", attn_implementation="eager").eval()
    examples = paired_examples(seed=2)
    with torch.no_grad():
        expected = direct_logps(model, examples)
        for prefix_sharing in (True, False):
            out = sequence_logps(model, Collator(2, prefix_sharing)(examples), 3)
            torch.testing.assert_close(out["logps"], expected, atol=1e-4, rtol=0)


def test_padding_multiple_and_batch_order_do_not_matter(tiny_model):
    examples = paired_examples(seed=3)
    with torch.no_grad():
        a = sequence_logps(tiny_model, Collator(2, pad_to_multiple_of=64)(examples), 0)["logps"]
        b = sequence_logps(tiny_model, Collator(2)(examples[::-1]), 4)["logps"]
        single = torch.cat([sequence_logps(tiny_model, Collator(2)([ex]), 0)["logps"] for ex in examples])
    rev = b.view(-1, 2).flip(0).flatten()
    torch.testing.assert_close(a, rev, atol=1e-4, rtol=0)
    torch.testing.assert_close(a, single, atol=1e-4, rtol=0)


def _grads(model, names):
    params = dict(model.named_parameters())
    return {n: params[n].grad.detach().clone() for n in names}


GRAD_PARAMS = [
    "model.embed_tokens.weight",  # tied with the lm-head: both paths meet here
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.layers.1.self_attn.v_proj.weight",
    "model.norm.weight",
]


@pytest.mark.parametrize("prefix_sharing,chunk", [(True, 3), (False, 0), (True, 0)])
def test_gradients_match_direct(tiny_dir, prefix_sharing, chunk):
    model = load_model(tiny_dir, dtype="float32")
    model.train()  # dropout is 0 in this config; train mode exercises the checkpointed lm-head
    examples = paired_examples(seed=5)[:4]
    batch = Collator(2, prefix_sharing=prefix_sharing)(examples)
    # weight the sequences differently so that a swapped or misassigned sequence changes the gradient
    w = torch.linspace(0.5, 2.0, len(examples) * 2)

    model.zero_grad()
    (sequence_logps(model, batch, chunk)["logps"] * w).sum().backward()
    engine = _grads(model, GRAD_PARAMS)

    model.zero_grad()
    (direct_logps(model, examples) * w).sum().backward()
    direct = _grads(model, GRAD_PARAMS)

    for name in GRAD_PARAMS:
        assert engine[name].abs().sum() > 0, name
        # float32 sums over different summation orders: elementwise rtol 1e-4, plus an absolute
        # floor of 1e-4 of the tensor's largest entry for entries that are ~0
        scale = direct[name].abs().max().item()
        torch.testing.assert_close(engine[name], direct[name], rtol=1e-4, atol=1e-4 * scale, msg=name)
        rel = ((engine[name] - direct[name]).norm() / direct[name].norm()).item()
        assert rel < 1e-4, (name, rel)


def test_sparse_tied_embedding_grads_are_exact(tiny_dir):
    """The tied embedding's lookup gradient as sparse rows gives the same dense gradient (over two
    accumulated micro-batches) and the same AdamW step; frozen or untied embeddings are left alone."""
    from prefopt.modeling.sparse_embedding import sparse_tied_embedding_grads

    torch.manual_seed(0)
    models = [load_model(tiny_dir, dtype="float32") for _ in range(2)]
    dense, sparse = models
    assert sparse_tied_embedding_grads(sparse) is True
    assert sparse.get_input_embeddings().sparse and not dense.get_input_embeddings().sparse
    assert sparse_tied_embedding_grads(sparse) is False  # already on
    batches = [Collator(2)(paired_examples(seed=s)[:3]) for s in (7, 8)]
    w = torch.linspace(0.5, 2.0, 6)
    grads, weights = [], []
    for model in models:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for batch in batches:  # gradient accumulation: the second lookup adds into the first's
            (sequence_logps(model, batch, 3)["logps"] * w).sum().backward()
        emb = model.get_input_embeddings().weight
        assert emb.grad.layout == torch.strided  # the optimiser sees a dense gradient
        grads.append(emb.grad.clone())
        opt.step()
        weights.append(emb.detach().clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-6, atol=1e-7)

    frozen = load_model(tiny_dir, dtype="float32")
    frozen.get_input_embeddings().weight.requires_grad_(False)
    assert sparse_tied_embedding_grads(frozen) is False
    untied = load_model(tiny_dir, dtype="float32")
    untied.get_output_embeddings().weight = torch.nn.Parameter(untied.get_output_embeddings().weight.clone())
    assert sparse_tied_embedding_grads(untied) is False


@pytest.mark.slow
def test_real_smollm2_matches_direct(smol_dir, smol_tokenizer):
    """The real model, real text, chat-formatted prompts: same log-probs both ways."""
    from prefopt.data.formats import Pair
    from prefopt.data.tokenize import PairTokenizer

    model = load_model(smol_dir, dtype="float32")
    model.eval()
    pt = PairTokenizer(smol_tokenizer, max_length=512, max_prompt_length=256)
    pairs = [
        Pair("What is the capital of France?", " Paris.", " I think it is Lyon, or maybe Marseille; hard to say."),
        Pair(
            [{"role": "user", "content": "Name a colour."}],
            [{"role": "assistant", "content": "Blue."}],
            [{"role": "assistant", "content": "Colours are perceptions of light wavelengths, so there are many."}],
        ),
    ]
    examples = [pt(p) for p in pairs]
    with torch.no_grad():
        expected = direct_logps(model, examples)
        for prefix_sharing, chunk in ((True, 5), (False, 0)):
            out = sequence_logps(model, Collator(smol_tokenizer.pad_token_id, prefix_sharing)(examples), chunk)
            torch.testing.assert_close(out["logps"], expected, atol=1e-4, rtol=1e-5)
    # sanity: the model is a real one (a sensible answer is more likely than noise per token)
    assert (expected / torch.tensor([float(len(r)) for ex in examples for r in responses(ex)])).max() > -6


@pytest.mark.slow
def test_real_smollm2_attention_paths_match(smol_dir):
    """The real model (grouped key/value heads: 9 query heads, 3 key/value heads): segment
    attention and the dense mask give the same log-probs as separate forwards (pairs of very
    different lengths, padded rows)."""
    model = load_model(smol_dir, dtype="float32").eval()
    examples = paired_examples(seed=9)[:3]
    batch = Collator(2)(examples)
    with torch.no_grad():
        expected = direct_logps(model, examples)
        for path in ("segments", "dense"):
            set_attention(model, path)
            out = sequence_logps(model, batch, 16)["logps"]
            torch.testing.assert_close(out, expected, atol=2e-4, rtol=1e-5, msg=path)
