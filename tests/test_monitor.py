"""Failure-mode warnings: each is provoked, on a stream of logged metrics and (where a tiny model can
provoke it for real) in training; a healthy run warns of nothing."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import TrainerControl

from prefopt import config, losses
from prefopt.errors import PrefoptError
from prefopt.recipes.train import train
from prefopt.training.monitor import REMEDY_DOCS, FailureMonitor

ROOT = Path(__file__).resolve().parents[1]


def feed(rows, **kw):
    mon, control = FailureMonitor(**kw), TrainerControl()
    for step, row in enumerate(rows, 1):
        mon.on_log(
            None, SimpleNamespace(global_step=step, is_world_process_zero=True), control, logs={"loss": 0.5, **row}
        )
    return mon, control


def pair_row(c, r, **extra):
    return {"rewards/chosen": c, "rewards/rejected": r, "rewards/margins": c - r, "logps/ref_chosen": -50.0, **extra}


def test_healthy_run_warns_of_nothing(caplog):
    rows = [pair_row(0.02 * k, -0.05 * k, **{"rewards/length_corr": 0.1}) for k in range(1, 20)]
    with caplog.at_level(logging.WARNING, logger="prefopt"):
        mon, control = feed(rows)
    assert mon.warned == {} and not control.should_training_stop and caplog.text == ""


def test_suppression_imbalance(caplog):
    rows = [pair_row(-0.1 * k, -0.3 * k) for k in range(1, 8)]
    with caplog.at_level(logging.WARNING, logger="prefopt"):
        mon, _ = feed(rows)
    assert mon.warned == {"suppression": 5}
    assert "step 5: chosen log-probs are falling together with rejected" in caplog.text


def test_length_exploitation():
    rows = [pair_row(0.1 * k, -0.1 * k, **{"rewards/length_corr": 0.2 + 0.1 * k}) for k in range(1, 9)]
    mon, _ = feed(rows)
    assert mon.warned == {"length": 5}  # r = 0.7 > 0.5 at the first full window


def test_margins_without_bound():
    rows = [pair_row(0.5 * k * k, -0.5 * k * k) for k in range(1, 8)]
    mon, _ = feed(rows)
    assert set(mon.warned) == {"over-optimising"}


def test_zero_margins_broken_setup():
    mon, _ = feed([pair_row(0.0, 0.0) for _ in range(8)])
    assert mon.warned == {"broken setup": 6}


def test_grpo_without_reward_signal():
    """GRPO logs whose groups all scored alike over the whole window: said once; one group with a
    spread in the window is enough to stay silent."""
    mon, _ = feed([{"reward": 0.0, "frac_reward_zero_std": 1.0} for _ in range(7)])
    assert mon.warned == {"no reward signal": 5}
    rows = [{"reward": 0.0, "frac_reward_zero_std": 1.0 if k % 4 else 0.75} for k in range(1, 8)]
    mon, _ = feed(rows)
    assert mon.warned == {}


@pytest.mark.parametrize("key", ["loss", "grad_norm"])
def test_non_finite_stops(key):
    rows = [pair_row(0.1, -0.1), pair_row(0.1, -0.1, **{key: float("nan")}), pair_row(0.1, -0.1)]
    mon, control = feed(rows)
    assert mon.nonfinite_step == 2 and control.should_training_stop and "non-finite" in mon.warned


WARNINGS = {  # failure mode -> (metrics that provoke it, the remedies its text must name)
    "suppression": ([pair_row(-0.1 * k, -0.3 * k) for k in range(1, 8)], ["dpop", "rpo"]),
    "length": (
        [pair_row(0.1 * k, -0.1 * k, **{"rewards/length_corr": 0.9}) for k in range(1, 8)],
        ["sampo", "ld_alpha", "simpo"],
    ),
    "over-optimising": ([pair_row(0.5 * k * k, -0.5 * k * k) for k in range(1, 8)], ["ipo", "beta"]),
}


def anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of `markdown` (lower case, punctuation dropped, spaces
    to hyphens) and explicit <a id="..."> anchors."""
    found = set(re.findall(r'<a (?:id|name)="([^"]+)"', markdown))
    for heading in re.findall(r"^#+ (.+)$", markdown, flags=re.M):
        found.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return found


@pytest.mark.parametrize("kind", sorted(WARNINGS))
def test_each_warning_names_its_remedies_and_links_to_them(kind, caplog):
    rows, remedies = WARNINGS[kind]
    with caplog.at_level(logging.WARNING, logger="prefopt"):
        mon, _ = feed(rows)
    assert set(mon.warned) == {kind}
    for remedy in remedies:
        assert re.search(rf"loss\.(name )?{remedy}\b", caplog.text), remedy
        if remedy in REMEDY_DOCS:
            assert REMEDY_DOCS[remedy] in caplog.text
        if remedy in losses.REGISTRY or remedy in losses.ALIASES:
            assert f"loss.name {remedy}" in caplog.text


def test_remedy_links_point_at_existing_sections():
    for remedy, link in REMEDY_DOCS.items():
        page, anchor = link.split("#")
        assert anchor in anchors((ROOT / page).read_text()), (remedy, link)
        assert remedy in losses.REGISTRY or remedy == "ld_alpha"


def test_anchor_reader_can_fail():
    assert anchors('## LD-DPO (length desensitised)\n<a id="x"></a>') == {"ld-dpo-length-desensitised", "x"}
    assert "dpop" not in anchors("## DPO\n")


# ---------------------------------------------------------------------------------------------
# provoked for real on the tiny model

PAIRS = [
    {
        "prompt": f"Question {i}: what is {i} plus {i}?",
        "chosen": f" {2 * i}.",
        "rejected": f" I do not know, maybe {i + 1} or so.",
    }
    for i in range(8)
]


def cfg_for(tiny_dir, tmp_path, **train_kw):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return config.from_dict(
        {
            "model": {"name": tiny_dir},
            "data": {"train": str(path), "max_length": 64, "max_prompt_length": 32},
            "reference": {"cache_dir": str(tmp_path / "ref")},
            "train": {
                "output_dir": str(tmp_path / "out"),
                "max_steps": 8,
                "batch_size": 2,
                "warmup_ratio": 0.0,
                "progress": False,
                "bf16": False,
                **train_kw,
            },
        }
    )


def test_policy_that_does_not_move_is_reported(tiny_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="prefopt"):
        train(cfg_for(tiny_dir, tmp_path, lr=1e-30))
    assert "margins have been exactly 0" in caplog.text and "step 6" in caplog.text


def test_divergence_stops_without_saving(tiny_dir, tmp_path):
    with pytest.raises(PrefoptError, match="training stopped at step .*not finite.*nothing was saved"):
        train(cfg_for(tiny_dir, tmp_path, lr=1e25, max_grad_norm=0.0))
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_length_correlation_is_logged_from_sixteen_sequences(tiny_dir, tmp_path):
    train(cfg_for(tiny_dir, tmp_path, lr=1e-2))
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    corr = [r.get("rewards/length_corr") for r in rows if "loss" in r]
    assert corr[:3] == [None] * 3  # 4 sequences a step: 16 reached at step 4
    assert all(-1 <= c <= 1 for c in corr[3:]) and len(corr) == 8
