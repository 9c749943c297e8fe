"""`prefopt demo --quick` on the embedded model: the whole path (sample, score, pair, train, sample
again, KL) runs, prints its table, writes its results, and a second run prints the same numbers."""

from __future__ import annotations

import json
import math

from prefopt.cli import main


def test_quick_demo_runs_and_reproduces(smol_dir, tmp_path, capsys):
    results = []
    for run in ("a", "b"):
        assert main(["demo", "--quick", "--out", str(tmp_path / run)]) == 0
        out = capsys.readouterr().out
        assert "mean sentiment reward" in out and "KL(policy || reference)" in out
        r = json.loads((tmp_path / run / "demo_results.json").read_text())
        results.append({k: v for k, v in r.items() if k != "seconds"})
    a, b = results
    assert a == b  # seeded end to end
    assert a["pairs"] + a["ties_dropped"] == 16 and a["pairs"] > 0
    assert abs(a["first_loss"] - math.log(2)) < 2e-3  # policy == reference at step 1 (bf16: to rounding)
    assert a["kl_nats"] > -0.5 and 0 <= a["win_rate"] <= 1
    assert (tmp_path / "a" / "adapter_config.json").is_file() and (tmp_path / "a" / "demo_pairs.jsonl").is_file()


def test_quick_code_demo_pairs_passing_with_failing_answers(smol_dir, tmp_path, capsys):
    """`prefopt demo --task code --quick`: Code-DPO's whole path on the embedded model — answers
    sampled, run against their problems' tests in the sandbox, a passing one paired with a failing
    one, DPO, held-out pass@1 of both models."""
    assert main(["demo", "--task", "code", "--quick", "--out", str(tmp_path / "code")]) == 0
    out = capsys.readouterr().out
    assert "Code-DPO on the code task" in out and "pass@1, temperature 1" in out
    r = json.loads((tmp_path / "code" / "demo_results.json").read_text())
    assert r["pairs"] > 0 and r["pairs"] + r["ties_dropped"] == 16
    pairs = [json.loads(line) for line in (tmp_path / "code" / "demo_pairs.jsonl").read_text().splitlines()]
    assert all(p["chosen_reward"] == 1.0 and p["rejected_reward"] == 0.0 for p in pairs)
    assert 0 <= r["reward_reference"] <= 1 and 0 <= r["reward_policy"] <= 1
