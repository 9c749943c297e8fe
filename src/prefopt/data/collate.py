"""Token ids -> one batch of rows for the log-prob engine.

An example is a prompt and K responses (K = 2 for a pair: chosen, rejected; K = 1 unpaired).
With prefix sharing, one row holds [prompt | response 1 | … | response K]: the prompt is computed
once, each response attends to the prompt and to itself only, and its positions continue from
the end of the prompt, exactly as if it were alone after the prompt. Without it, each response
gets its own row [prompt | response].

A batch carries, per token of each row: input id, position id, document id (which example; −1
for padding) and branch id (0 prompt, k for response k). `logprobs.py` builds the attention mask
from these. Scored tokens are listed flat: the index of the hidden state that predicts it
(`score_src`, into the flattened rows), the token (`score_tgt`) and its sequence (`score_seq`,
example i's response k is sequence i·K + k − 1).

For LD-DPO (`ld_prefix=True`, pairs only) the batch also flags each scored token that lies within
its pair's shared length l_p = min(len_c, len_r) (`score_prefix`, bool, one per scored token), so
the engine can sum the prefix log-probs separately; off by default (no extra work).
"""

from __future__ import annotations

import torch

def responses_of(example: dict) -> list[list[int]]:
    """[chosen, rejected] for a pair; [completion, mismatched KL completion] for an unpaired
    example with a KL baseline; else [completion]."""
    if "chosen_ids" in example:
        return [example["chosen_ids"], example["rejected_ids"]]
    if "kl_completion_ids" in example:
        return [example["completion_ids"], example["kl_completion_ids"]]
    return [example["completion_ids"]]


def row_length(example: dict, prefix_sharing: bool = True) -> int:
    resp = responses_of(example)
    p = len(example["prompt_ids"])
    return p + sum(len(r) for r in resp) if prefix_sharing else p + max(len(r) for r in resp)


class Collator:
    """Callable for a DataLoader: list of examples -> batch dict of tensors."""

    def __init__(self, pad_token_id: int, prefix_sharing: bool = True, pad_to_multiple_of: int = 1,
                 ld_prefix: bool = False):
        self.pad = pad_token_id
        self.prefix_sharing = prefix_sharing
        self.multiple = pad_to_multiple_of
        self.ld_prefix = ld_prefix  # emit `score_prefix` (position within response < min(len_c, len_r))

    def _rows(self, examples):
        """Yield (doc, [(branch, ids, scored_seq or None), ...]) for each row."""
        K = len(responses_of(examples[0]))
        for i, ex in enumerate(examples):
            resp = responses_of(ex)
            if len(resp) != K:
                raise ValueError("a batch mixes paired and unpaired examples")
            if self.prefix_sharing:
                segs = [(0, ex["prompt_ids"], None)] + [(k + 1, r, i * K + k) for k, r in enumerate(resp)]
                yield i, segs
            else:
                for k, r in enumerate(resp):
                    yield i, [(0, ex["prompt_ids"], None), (1, r, i * K + k)]

    def __call__(self, examples: list[dict]) -> dict:
        rows = list(self._rows(examples))
        T = max(sum(len(ids) for _, ids, _ in segs) for _, segs in rows)
        T = -(-T // self.multiple) * self.multiple
        R = len(rows)
        input_ids = torch.full((R, T), self.pad, dtype=torch.long)
        position_ids = torch.zeros((R, T), dtype=torch.long)
        doc_ids = torch.full((R, T), -1, dtype=torch.long)
        branch_ids = torch.zeros((R, T), dtype=torch.long)
        src, tgt, seq = [], [], []
        ld = self.ld_prefix
        if ld and "chosen_ids" not in examples[0]:
            raise ValueError("ld_prefix (LD-DPO's shared-length split) needs pairs (chosen_ids, rejected_ids)")
        prefix: list[bool] = []
        for r, (doc, segs) in enumerate(rows):
            if ld:
                shared = min(len(examples[doc]["chosen_ids"]), len(examples[doc]["rejected_ids"]))
            t = 0
            prompt_len = len(segs[0][1])
            for branch, ids, s in segs:
                n = len(ids)
                input_ids[r, t:t + n] = torch.tensor(ids, dtype=torch.long)
                doc_ids[r, t:t + n] = doc
                branch_ids[r, t:t + n] = branch
                if branch == 0:
                    position_ids[r, t:t + n] = torch.arange(n)
                else:
                    position_ids[r, t:t + n] = torch.arange(prompt_len, prompt_len + n)
                    # token j of this response is predicted by the hidden state before it:
                    # the last prompt token for j = 0, else the previous response token.
                    first_src = r * T + prompt_len - 1
                    src.append(first_src)
                    src.extend(range(r * T + t, r * T + t + n - 1))
                    tgt.extend(ids)
                    seq.extend([s] * n)
                    if ld:
                        k = min(n, shared)
                        prefix.extend([True] * k + [False] * (n - k))
                t += n
            position_ids[r, t:] = torch.arange(T - t)  # padding: own positions, never NaN
        K = len(responses_of(examples[0]))
        batch = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "doc_ids": doc_ids,
            "branch_ids": branch_ids,
            "score_src": torch.tensor(src, dtype=torch.long),
            "score_tgt": torch.tensor(tgt, dtype=torch.long),
            "score_seq": torch.tensor(seq, dtype=torch.long),
            "n_seqs": torch.tensor(len(examples) * K),
        }
        if ld:
            batch["score_prefix"] = torch.tensor(prefix, dtype=torch.bool)
        for key in ("ref_logps", "ref_prefix_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([v for ex in examples for v in ex[key]], dtype=torch.float32)
        if "label" in examples[0]:
            batch["labels_bool"] = torch.tensor([bool(ex["label"]) for ex in examples])
        return batch
