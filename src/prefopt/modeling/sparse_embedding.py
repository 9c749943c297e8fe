"""Sparse gradients for a tied input embedding: no vocabulary-sized gradient buffer at the end of the backward.

When the input embedding and the lm-head share one weight (SmolLM2, Qwen2.5, Gemma, ...), the
backward first gives that weight the lm-head's dense gradient; the embedding lookup then produces
a second, dense, vocabulary × hidden gradient (113 MB for SmolLM2-135M, 2.4 GB for Gemma-2-2B) that
is added into it and freed — at the very moment every other gradient also exists, i.e. at the
step's peak. With `sparse=True` the lookup's gradient holds only the rows of the tokens in the batch
and is added into the dense gradient in place. The sum is the same; the parameter's gradient stays
dense (the optimiser and gradient clipping see nothing different).

Only for one process without an engine that manages gradients itself: DDP buckets, FSDP and
DeepSpeed expect dense gradients from every parameter.
"""

from __future__ import annotations

import torch

from prefopt.modeling.logprobs import unwrap


def sparse_tied_embedding_grads(model) -> bool:
    """Switch the tied, trainable input embedding of `model` to sparse lookup gradients; returns
    whether it did (False: untied, frozen (LoRA), not an nn.Embedding, or already sparse)."""
    causal_lm = unwrap(model)
    emb, head = causal_lm.get_input_embeddings(), causal_lm.get_output_embeddings()
    if not isinstance(emb, torch.nn.Embedding) or head is None or emb.sparse:
        return False
    if emb.weight is not getattr(head, "weight", None) or not emb.weight.requires_grad:
        return False
    emb.sparse = True
    return True
