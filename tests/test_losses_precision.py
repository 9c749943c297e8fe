"""Numerical precision of the loss pieces at extreme inputs, and the loss.wpo_clamp key.

f-DPO's Jensen–Shannon score f′ = log 2 + u − log(1 + e^u) (u = log π − log π_ref) must keep its
value and its gradient σ(−u) for |u| far beyond 20 in float32: a naive form loses the gradient
entirely above u ≈ 17-20 (it was exactly 0 there). The float64 reference below is written
independently, with math functions only.
"""

from __future__ import annotations

import math

import pytest
import torch

from prefopt import config, losses
from prefopt.errors import PrefoptError

U = [-60.0, -30.0, -21.0, -20.0, 0.0, 20.0, 21.0, 30.0, 60.0]
REF = -100.0  # log π_ref; log π = REF + u is exact in float32 for these u


def js_float64(u: float) -> float:
    """log 2 + u − log(1 + e^u), stably in float64: log(1 + e^u) = u + log1p(e^−u) for u > 0."""
    softplus = u + math.log1p(math.exp(-u)) if u > 0 else math.log1p(math.exp(u))
    return math.log(2.0) + u - softplus


def js_grad_float64(u: float) -> float:
    """d/du of the above: 1 − σ(u) = σ(−u)."""
    return math.exp(-u) / (1.0 + math.exp(-u)) if u >= 0 else 1.0 / (1.0 + math.exp(u))


def js_value_and_grads():
    logp = torch.tensor([REF + u for u in U], dtype=torch.float32, requires_grad=True)
    ref_logp = torch.full((len(U),), REF, dtype=torch.float32, requires_grad=True)
    assert torch.equal((logp - ref_logp).detach(), torch.tensor(U))
    value = losses.f_log_ratio(logp, ref_logp, "js")
    assert value.dtype == torch.float32
    value.sum().backward()
    return value.detach(), logp.grad, ref_logp.grad


def test_js_value_float32_matches_float64_closed_form():
    value, _, _ = js_value_and_grads()
    worst = 0.0
    for u, v in zip(U, value.tolist()):
        want = js_float64(u)
        worst = max(worst, abs(v - want) / max(abs(want), 1e-30))
        # float32 rounding of the result: a few ulp (near u = 0 the value is ~0 and ulp is absolute)
        assert v == pytest.approx(want, rel=1e-6, abs=1e-7), (u, v, want)
    print(f"js value: max rel diff {worst:.2e}")
    assert torch.isfinite(value).all()


def test_js_gradient_float32_matches_sigma_of_minus_u():
    _, g_logp, g_ref = js_value_and_grads()
    worst = 0.0
    for u, g, gr in zip(U, g_logp.tolist(), g_ref.tolist()):
        want = js_grad_float64(u)
        worst = max(worst, abs(g - want) / want)
        assert g == pytest.approx(want, rel=1e-5), (u, g, want)  # relative, also at σ(−60) ≈ 8.8e-27
        assert gr == -g  # d/d ref_logp = −d/d logp
    print(f"js gradient: max rel diff {worst:.2e}")
    # the old bug: exactly 0 above u = 20; the true gradient there is e^−u > 0 and float32 holds it
    for u, g in zip(U, g_logp.tolist()):
        if u > 20:
            assert g > 0.0, (u, g)
    assert (g_logp > 0).all()


def test_js_f_dpo_loss_still_learns_at_large_log_ratio():
    """Through the f-DPO sigmoid loss: a chosen log-ratio of 30 still gets a (tiny, right-signed) push."""
    logp_c = torch.tensor([REF + 30.0], requires_grad=True)
    logp_r = torch.tensor([REF - 5.0], requires_grad=True)
    ref = torch.tensor([REF])
    loss = losses.sigmoid(logp_c, logp_r, ref, ref, beta=0.1, f_divergence="js").sum()
    loss.backward()
    assert torch.isfinite(loss)
    assert logp_c.grad.item() < 0  # descending the loss raises log π(chosen)
    assert logp_r.grad.item() > 0


# ---- WPO weight cap: loss.wpo_clamp ------------------------------------------------------------


def test_wpo_clamp_config_key_accepted():
    cfg = config.load(None, ["--loss.wpo", "true", "--loss.wpo_clamp", "0.5"])
    assert cfg.loss.wpo is True and cfg.loss.wpo_clamp == 0.5
    assert config.LossConfig().wpo_clamp == 1.0  # default: capped at 1
    assert config.load(None, ["--loss.wpo", "true", "--loss.wpo_clamp", "null"]).loss.wpo_clamp is None


@pytest.mark.parametrize("bad", ["0", "-1"])
def test_wpo_clamp_must_be_positive(bad):
    with pytest.raises(PrefoptError, match=r"loss\.wpo_clamp"):
        config.load(None, ["--loss.wpo", "true", "--loss.wpo_clamp", bad])


def test_wpo_weights_clamp_max():
    # per-token log-probs minus the log squared mass: pair 0 has exponent 1.5 + 1.0 (weight e^2.5 > 1),
    # pair 1 exponent −3 (weight e^−3 ≈ 0.05, below every cap)
    logp_c = torch.tensor([-2.0, -4.0], requires_grad=True)
    logp_r = torch.tensor([-3.0, -4.0], requires_grad=True)
    len_c, len_r = torch.tensor([2.0, 2.0]), torch.tensor([3.0, 4.0])
    sq_c, sq_r = torch.tensor([-5.0, -2.0]), torch.tensor([-6.0, 0.0])
    expected = torch.exp((logp_c.detach() - sq_c) / len_c + (logp_r.detach() - sq_r) / len_r)
    assert expected[0] > 1 and expected[1] < 0.5

    def w(clamp):
        return losses.wpo_weights(logp_c, logp_r, len_c, len_r, sq_mass_c=sq_c, sq_mass_r=sq_r, clamp_max=clamp)

    uncapped = w(None)
    assert uncapped[0] > 1
    torch.testing.assert_close(uncapped, expected)
    torch.testing.assert_close(w(0.5), torch.tensor([0.5, expected[1].item()]))
    torch.testing.assert_close(w(1.0), torch.tensor([1.0, expected[1].item()]))
    torch.testing.assert_close(
        losses.wpo_weights(logp_c, logp_r, len_c, len_r, sq_mass_c=sq_c, sq_mass_r=sq_r), w(1.0)
    )  # default cap 1
    assert not uncapped.requires_grad  # detached: the weights are not trained through
