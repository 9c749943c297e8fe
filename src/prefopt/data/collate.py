"""Token ids -> one batch of rows for the log-prob engine.

An example is a prompt and K responses (K = 2 for a pair: chosen, rejected; K = 1 unpaired; K = G
for a GRPO group, the G completions sampled for one prompt, under `group_ids`).
With prefix sharing, one row holds [prompt | response 1 | … | response K]: the prompt is computed
once, each response attends to the prompt and to itself only, and its positions continue from
the end of the prompt, exactly as if it were alone after the prompt. Without it, each response
gets its own row [prompt | response].

A batch carries, per token of each row: input id, position id, document id (which example; −1
for padding) and branch id (0 prompt, k for response k). `logprobs.py` builds the attention mask
from these. Scored tokens are listed flat: the index of the hidden state that predicts it
(`score_src`, into the flattened rows), the token (`score_tgt`) and its sequence (`score_seq`,
example i's response k is sequence i·K + k − 1).

A collator built with a token `subset` (pairs only) also flags, per scored token, whether it belongs
to its response's subset (`score_subset`, bool, one per scored token), so the engine sums the
subset's log-probs separately (`subset_logps`); off by default (no extra work). The subsets:

    prefix  LD-DPO: each response's first l_p = min(len_c, len_r) tokens
    sample  SamPO: min(len_c, len_r) positions of each response, drawn by losses.sampo_positions
            (the shorter keeps all) with a seed derived from the collator's `seed` and the pair's
            token ids (`pair_seed`): the same positions in the reference precompute, in every
            epoch, after a resume and on every process
"""

from __future__ import annotations

import hashlib
from array import array
from typing import Optional

import torch

from prefopt import losses

SUBSETS = ("prefix", "sample")  # the token subsets a Collator can flag (see the module docstring)


def responses_of(example: dict) -> list[list[int]]:
    """[chosen, rejected] for a pair; [completion, mismatched KL completion] for an unpaired
    example with a KL baseline; the G completions of a group (`group_ids`); else [completion]."""
    if "group_ids" in example:
        return example["group_ids"]
    if "chosen_ids" in example:
        return [example["chosen_ids"], example["rejected_ids"]]
    if "kl_completion_ids" in example:
        return [example["completion_ids"], example["kl_completion_ids"]]
    return [example["completion_ids"]]


def subset_mode(token_subset: Optional[str], ld_alpha: Optional[float]) -> Optional[str]:
    """The token subset a training run's collator flags: "prefix" with LD-DPO (`ld_alpha` set),
    else the loss's own (`LossSpec.token_subset`, e.g. "sample" for SamPO), else None."""
    return "prefix" if ld_alpha is not None else token_subset


def pair_seed(example: dict, seed: int) -> int:
    """The seed of a pair's SamPO sample: a hash of `seed` and the pair's token ids (prompt, chosen,
    rejected), in [0, 2**63); the same in every process and every run with that seed."""
    h = hashlib.blake2b(str(seed).encode(), digest_size=8)
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        ids = example[key]
        h.update(len(ids).to_bytes(8, "little"))
        h.update(array("q", ids).tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def subset_masks(example: dict, subset: str, seed: int) -> list[list[bool]]:
    """[chosen mask, rejected mask]: for each token of each response of the pair `example`, whether
    it belongs to the token `subset` ("prefix" or "sample", see the module docstring)."""
    n_c, n_r = len(example["chosen_ids"]), len(example["rejected_ids"])
    if subset == "prefix":
        shared = min(n_c, n_r)
        return [[j < shared for j in range(n)] for n in (n_c, n_r)]
    kept_c, kept_r = losses.sampo_positions(n_c, n_r, pair_seed(example, seed))
    return [_mask(n_c, kept_c), _mask(n_r, kept_r)]


def _mask(n: int, kept) -> list[bool]:
    """A list of n booleans, True at the positions `kept`."""
    mask = [False] * n
    for position in kept:
        mask[int(position)] = True
    return mask


def row_length(example: dict, prefix_sharing: bool = True) -> int:
    """Tokens in the row(s) of `example`: prompt + all responses with prefix sharing, else prompt + the longest."""
    resp = responses_of(example)
    p = len(example["prompt_ids"])
    return p + sum(len(r) for r in resp) if prefix_sharing else p + max(len(r) for r in resp)


class Collator:
    """Callable for a DataLoader: list of examples -> batch dict of tensors. With a token `subset`
    ("prefix" or "sample"; pairs only) the batch also flags each scored token of the subset
    (`score_subset`); `seed` seeds the "sample" subset (the training seed)."""

    def __init__(
        self,
        pad_token_id: int,
        prefix_sharing: bool = True,
        pad_to_multiple_of: int = 1,
        subset: Optional[str] = None,
        seed: int = 0,
    ):
        if subset is not None and subset not in SUBSETS:
            raise ValueError(f"Collator: subset must be one of {', '.join(SUBSETS)} or None, found {subset!r}")
        self.pad = pad_token_id
        self.prefix_sharing = prefix_sharing
        self.multiple = pad_to_multiple_of
        self.subset = subset
        self.seed = seed

    def _rows(self, examples):
        """Yield (doc, [(branch, ids, scored_seq or None), ...]) for each row."""
        K = len(responses_of(examples[0]))
        for i, ex in enumerate(examples):
            resp = responses_of(ex)
            if len(resp) != K:
                raise ValueError("a batch mixes examples with different numbers of responses")
            if self.prefix_sharing:
                segs = [(0, ex["prompt_ids"], None)] + [(k + 1, r, i * K + k) for k, r in enumerate(resp)]
                yield i, segs
            else:
                for k, r in enumerate(resp):
                    yield i, [(0, ex["prompt_ids"], None), (1, r, i * K + k)]

    def width(self, examples: list[dict]) -> int:
        """The width (tokens per row) of the batch `examples` make: the longest row, rounded up to
        pad_to_multiple_of."""
        return self._width(list(self._rows(examples)))

    def _width(self, rows: list) -> int:
        width = max((sum(len(ids) for _, ids, _ in segs) for _, segs in rows), default=0)
        return -(-width // self.multiple) * self.multiple

    def __call__(self, examples: list[dict]) -> dict:
        """Pack `examples` (token-id dicts from PairTokenizer) into one padded batch of tensors."""
        rows = list(self._rows(examples))
        width = self._width(rows)
        masks = self._masks(examples)
        packed = _Packed(len(rows), width, self.pad, masks)
        for r, (doc, segs) in enumerate(rows):
            packed.fill_row(r, doc, segs)
        batch = packed.tensors(n_seqs=len(examples) * len(responses_of(examples[0])))
        batch.update(_per_example(examples))
        return batch

    def _masks(self, examples: list[dict]) -> Optional[list[list[bool]]]:
        """The subset mask of every sequence (example i's response k is sequence 2i + k), or None
        without a subset."""
        if self.subset is None:
            return None
        if "chosen_ids" not in examples[0]:
            raise ValueError(f"the token subset '{self.subset}' needs pairs (chosen_ids, rejected_ids)")
        return [mask for ex in examples for mask in subset_masks(ex, self.subset, self.seed)]


def _per_example(examples: list[dict]) -> dict:
    """Values carried per example: precomputed reference log-probs, and unpaired labels."""
    out = {}
    for key in ("ref_logps", "ref_subset_logps"):
        if key in examples[0]:
            out[key] = torch.tensor([v for ex in examples for v in ex[key]], dtype=torch.float32)
    if "label" in examples[0]:
        out["labels_bool"] = torch.tensor([bool(ex["label"]) for ex in examples])
    return out


class _Packed:
    """The batch being built: per-token row tensors, and the flat lists of scored tokens."""

    def __init__(self, rows: int, width: int, pad: int, masks: Optional[list[list[bool]]]):
        self.width = width
        self.input_ids = torch.full((rows, width), pad, dtype=torch.long)
        self.position_ids = torch.zeros((rows, width), dtype=torch.long)
        self.doc_ids = torch.full((rows, width), -1, dtype=torch.long)
        self.branch_ids = torch.zeros((rows, width), dtype=torch.long)
        self.src: list[int] = []
        self.tgt: list[int] = []
        self.seq: list[int] = []
        self.masks = masks  # per sequence: its subset mask (None: no subset)
        self.subset: Optional[list[bool]] = [] if masks is not None else None

    def fill_row(self, r: int, doc: int, segs: list) -> None:
        """Lay out row r's segments (prompt, then responses) and list each response token as scored."""
        t = 0
        prompt_len = len(segs[0][1])
        for branch, ids, s in segs:
            n = len(ids)
            self.input_ids[r, t : t + n] = torch.tensor(ids, dtype=torch.long)
            self.doc_ids[r, t : t + n] = doc
            self.branch_ids[r, t : t + n] = branch
            if branch == 0:
                self.position_ids[r, t : t + n] = torch.arange(n)
            else:
                self.position_ids[r, t : t + n] = torch.arange(prompt_len, prompt_len + n)
                self._score(r * self.width + prompt_len - 1, r * self.width + t, ids, s)
            t += n
        self.position_ids[r, t:] = torch.arange(self.width - t)  # padding: own positions, never NaN

    def _score(self, first_src: int, start: int, ids: list[int], seq: int) -> None:
        # token j of this response is predicted by the hidden state before it:
        # the last prompt token for j = 0, else the previous response token.
        n = len(ids)
        self.src.append(first_src)
        self.src.extend(range(start, start + n - 1))
        self.tgt.extend(ids)
        self.seq.extend([seq] * n)
        if self.subset is not None:
            self.subset.extend(self.masks[seq])

    def tensors(self, n_seqs: int) -> dict:
        """The batch dict (without per-example values)."""
        batch = {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "doc_ids": self.doc_ids,
            "branch_ids": self.branch_ids,
            "score_src": torch.tensor(self.src, dtype=torch.long),
            "score_tgt": torch.tensor(self.tgt, dtype=torch.long),
            "score_seq": torch.tensor(self.seq, dtype=torch.long),
            "n_seqs": torch.tensor(n_seqs),
        }
        if self.subset is not None:
            batch["score_subset"] = torch.tensor(self.subset, dtype=torch.bool)
        return batch
