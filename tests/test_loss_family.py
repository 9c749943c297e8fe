"""Every registered loss against hand computation, autograd and its registry declaration.

(a) golden values: each loss is recomputed here with Python's `math` on plain floats, independently
    of torch, for at least two inputs and two hyperparameter settings;
(b) torch.autograd.gradcheck in float64 w.r.t. the policy log-probs;
(c) DPO's analytic gradient;
(d) the registry: declarations, aliases, `get`/`names`, hyperparameters accepted by each fn.
"""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch

from prefopt import losses

DT = torch.float64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; avoids OpenMP contention on a shared machine
    yield
    torch.set_num_threads(threads)


def t(x):
    return torch.tensor(x, dtype=DT)


# --------------------------------------------------------------------------------------------
# scalar references (plain floats, math only)
# --------------------------------------------------------------------------------------------


def sig(x):
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def smoothed(x, eps):
    return -(1 - eps) * logsig(x) - eps * logsig(-x)


def f_prime(u, divergence, alpha):
    if divergence == "reverse_kl":
        return u
    if divergence == "forward_kl":
        return -math.exp(-u)
    if divergence == "js":
        return math.log(2 * math.exp(u) / (1 + math.exp(u)))  # log(2x/(1+x)), x = π/π_ref
    return (1 - math.exp(u) ** (-alpha)) / alpha  # (1 − x^−α)/α


def mean(xs):
    return sum(xs) / len(xs)


def pairs(d):
    return range(len(d["lc"]))


def ref_sigmoid(d, beta=0.1, label_smoothing=0.0, f_divergence="reverse_kl", f_alpha=1.0):
    out = []
    for i in pairs(d):
        h = f_prime(d["lc"][i] - d["rc"][i], f_divergence, f_alpha) - f_prime(
            d["lr"][i] - d["rr"][i], f_divergence, f_alpha
        )
        out.append(smoothed(beta * h, label_smoothing))
    return out


def _h(d, i):
    return (d["lc"][i] - d["rc"][i]) - (d["lr"][i] - d["rr"][i])


def ref_robust(d, beta=0.1, label_smoothing=0.0):
    e = label_smoothing
    return [((1 - e) * -logsig(beta * _h(d, i)) - e * -logsig(-beta * _h(d, i))) / (1 - 2 * e) for i in pairs(d)]


def ref_ipo(d, beta=0.1, ipo_normalize=True):
    out = []
    for i in pairs(d):
        a, b = d["lc"][i] - d["rc"][i], d["lr"][i] - d["rr"][i]
        if ipo_normalize:
            a, b = a / d["nc"][i], b / d["nr"][i]
        out.append((a - b - 1 / (2 * beta)) ** 2)
    return out


def ref_hinge(d, beta=0.1):
    return [max(0.0, 1 - beta * _h(d, i)) for i in pairs(d)]


def ref_exo_pair(d, beta=0.1, label_smoothing=1e-3):
    e = label_smoothing or 1e-3
    out = []
    for i in pairs(d):
        p = sig(beta * _h(d, i))
        out.append(p * (math.log(p) - math.log(1 - e)) + (1 - p) * (math.log(1 - p) - math.log(e)))
    return out


def ref_nca_pair(d, beta=0.1):
    return [
        -logsig(beta * (d["lc"][i] - d["rc"][i]))
        - 0.5 * logsig(-beta * (d["lc"][i] - d["rc"][i]))
        - 0.5 * logsig(-beta * (d["lr"][i] - d["rr"][i]))
        for i in pairs(d)
    ]


def _delta(rewards, state):
    if state is None:
        return mean(rewards)
    m0, n0 = state
    n = len(rewards)
    return m0 + (mean(rewards) - m0) * n / (n0 + n)


def ref_bco_pair(d, beta=0.1, state=None):
    rc = [beta * (d["lc"][i] - d["rc"][i]) for i in pairs(d)]
    rr = [beta * (d["lr"][i] - d["rr"][i]) for i in pairs(d)]
    delta = _delta(rc + rr, state)
    return [-logsig(rc[i] - delta) - logsig(-(rr[i] - delta)) for i in pairs(d)]


def ref_sppo_hard(d, beta=0.1):
    return [(d["lc"][i] - d["rc"][i] - 0.5 / beta) ** 2 + (d["lr"][i] - d["rr"][i] + 0.5 / beta) ** 2 for i in pairs(d)]


def ref_aot(d, beta=0.1, label_smoothing=0.0):
    a = sorted(d["lc"][i] - d["lr"][i] for i in pairs(d))
    b = sorted(d["rc"][i] - d["rr"][i] for i in pairs(d))
    return [smoothed(beta * (x - y), label_smoothing) for x, y in zip(a, b)]


def ref_aot_pair(d, beta=0.1, label_smoothing=0.0):
    a = sorted(d["lc"][i] - d["rc"][i] for i in pairs(d))
    b = sorted(d["lr"][i] - d["rr"][i] for i in pairs(d))
    return [smoothed(beta * (x - y), label_smoothing) for x, y in zip(a, b)]


def ref_apo_zero(d, beta=0.1):
    return [1 - sig(beta * (d["lc"][i] - d["rc"][i])) + sig(beta * (d["lr"][i] - d["rr"][i])) for i in pairs(d)]


def ref_apo_down(d, beta=0.1):
    return [sig(beta * (d["lc"][i] - d["rc"][i])) + 1 - sig(beta * _h(d, i)) for i in pairs(d)]


def ref_discopop(d, beta=0.1, discopop_tau=0.05):
    out = []
    for i in pairs(d):
        x = beta * _h(d, i)
        m = sig(x / discopop_tau)
        out.append((1 - m) * -logsig(x) + m * math.exp(-x))
    return out


def ref_sigmoid_norm(d, beta=5.0):
    return [
        -logsig(beta * ((d["lc"][i] - d["rc"][i]) / d["nc"][i] - (d["lr"][i] - d["rr"][i]) / d["nr"][i]))
        for i in pairs(d)
    ]


def ref_dpop(d, beta=0.1, dpop_lambda=50.0):
    return [-logsig(beta * (_h(d, i) - dpop_lambda * max(0.0, d["rc"][i] - d["lc"][i]))) for i in pairs(d)]


def ref_cal_dpo(d, beta=0.1):
    out = []
    for i in pairs(d):
        a, b = d["lc"][i] - d["rc"][i], d["lr"][i] - d["rr"][i]
        out.append(-logsig(a - b) + (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2)
    return out


def ref_sampo(d, beta=0.1):
    # the inputs stand for the subset sums; on them SamPO is DPO
    return [-logsig(beta * _h(d, i)) for i in pairs(d)]


def ref_tr_dpo(d, beta=0.1, tr_alpha=0.6, tr_tau=512):
    # the loss is DPO against whatever reference it is given (the reference's moves are the caller's)
    return [-logsig(beta * _h(d, i)) for i in pairs(d)]


def _beta_dpo_fold(margins, state):
    """(M0, σ) after folding `margins` into state = (mean, std, count, momentum), by hand."""
    mean0, std0, count, m = state
    bm = mean(margins)
    bs = math.sqrt(sum((x - bm) ** 2 for x in margins) / (len(margins) - 1))
    new_mean = bm if count == 0 else m * mean0 + (1 - m) * bm
    new_std = bs if std0 is None else m * std0 + (1 - m) * bs
    return new_mean, new_std


def ref_beta_dpo(d, beta=0.1, beta_dpo_alpha=0.6, beta_dpo_rho=0.8, state=None):
    """β-DPO with every pair kept (ρ = 1; ρ < 1 draws pairs at random, tested separately)."""
    if beta_dpo_rho != 1.0:
        raise ValueError("the scalar reference covers beta_dpo_rho = 1 only")
    h = [_h(d, i) for i in pairs(d)]
    m0 = mean(h) if state is None else _beta_dpo_fold(h, state)[0]
    b = max(1e-3, beta * (1 + beta_dpo_alpha * (mean(h) - m0)))
    return [-logsig(b * x) for x in h]


def ref_sigmoid_ref_free(d, beta=0.1, label_smoothing=0.0):
    return [smoothed(beta * (d["lc"][i] - d["lr"][i]), label_smoothing) for i in pairs(d)]


def ref_simpo(d, beta=2.0, gamma=1.0):
    return [-logsig(beta * d["lc"][i] / d["nc"][i] - beta * d["lr"][i] / d["nr"][i] - gamma) for i in pairs(d)]


def ref_alphapo(d, beta=2.0, gamma=1.0, alphapo_alpha=0.25):
    def r(lp, n):
        m = lp / n
        return m if alphapo_alpha == 0 else (1 - math.exp(-alphapo_alpha * m)) / alphapo_alpha

    return [-logsig(beta * (r(d["lc"][i], d["nc"][i]) - r(d["lr"][i], d["nr"][i])) - gamma) for i in pairs(d)]


def ref_cpo(d, beta=0.1, alpha=1.0):
    return [-logsig(beta * (d["lc"][i] - d["lr"][i])) - alpha * d["lc"][i] / d["nc"][i] for i in pairs(d)]


def ref_orpo(d, orpo_lambda=0.1):
    out = []
    for i in pairs(d):
        mc, mr = d["lc"][i] / d["nc"][i], d["lr"][i] / d["nr"][i]
        odds_c = math.log(math.exp(mc) / (1 - math.exp(mc)))
        odds_r = math.log(math.exp(mr) / (1 - math.exp(mr)))
        out.append(-mc - orpo_lambda * logsig(odds_c - odds_r))
    return out


def ref_sft(d):
    return [-d["lc"][i] / d["nc"][i] for i in pairs(d)]


def ref_rpo(d, beta=0.1, label_smoothing=0.0, f_divergence="reverse_kl", f_alpha=1.0, rpo_alpha=1.0):
    base = ref_sigmoid(d, beta, label_smoothing, f_divergence, f_alpha)
    return [b + rpo_alpha * n for b, n in zip(base, ref_sft(d))]


def ref_mpo(d, beta=0.1, label_smoothing=0.0, f_divergence="reverse_kl", f_alpha=1.0, state=None):
    a = ref_sigmoid(d, beta, label_smoothing, f_divergence, f_alpha)
    b = ref_bco_pair(d, beta, state)
    c = ref_sft(d)
    return [0.8 * x + 0.2 * y + 1.0 * z for x, y, z in zip(a, b, c)]


def ref_kto(d, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    z0 = 0.0
    if d.get("kl") is not None:
        z0 = max(0.0, mean([a - b for a, b in zip(d["kl"], d["kl_ref"])]))
    out = []
    for lp, rp, good in zip(d["lp"], d["ref"], d["label"]):
        delta = lp - rp
        out.append(
            desirable_weight * (1 - sig(beta * (delta - z0)))
            if good
            else undesirable_weight * (1 - sig(beta * (z0 - delta)))
        )
    return out


def ref_bco(d, beta=0.1, state=None):
    r = [beta * (lp - rp) for lp, rp in zip(d["lp"], d["ref"])]
    delta = _delta(r, state)
    return [-logsig(x - delta) if good else -logsig(-(x - delta)) for x, good in zip(r, d["label"])]


def ref_apo_zero_unpaired(d, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    return [
        desirable_weight * (1 - sig(beta * (lp - rp))) if good else undesirable_weight * sig(beta * (lp - rp))
        for lp, rp, good in zip(d["lp"], d["ref"], d["label"])
    ]


REFERENCE = {name[4:]: fn for name, fn in globals().items() if name.startswith("ref_") and callable(fn)}

# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------

PAIRED_INPUTS = [
    # no ties among the sorted quantities of AOT (its gradient is only piecewise smooth)
    dict(
        lc=[-3.2, -10.5, -6.95],
        lr=[-4.1, -9.0, -7.9],
        rc=[-3.5, -10.0, -7.4],
        rr=[-3.9, -9.7, -7.05],
        nc=[4.0, 12.0, 7.0],
        nr=[5.0, 9.0, 8.0],
    ),
    dict(lc=[-20.0, -1.5], lr=[-35.0, -0.7], rc=[-25.0, -1.0], rr=[-30.0, -1.2], nc=[10.0, 2.0], nr=[14.0, 1.0]),
]
UNPAIRED_INPUTS = [
    dict(
        lp=[-3.0, -8.0, -5.5, -2.0],
        ref=[-3.4, -7.5, -5.0, -2.6],
        label=[True, False, True, False],
        kl=[-4.0, -6.0, -3.0],
        kl_ref=[-4.5, -6.2, -3.9],
    ),  # z0 = 0.533…
    dict(
        lp=[-12.0, -1.0, -30.0],
        ref=[-10.0, -1.5, -26.0],
        label=[False, True, True],
        kl=[-4.0, -6.0],
        kl_ref=[-3.0, -5.5],
    ),  # mean KL estimate < 0 → z0 = 0
]

# hyperparameters for the second golden run of each loss (the first uses the defaults)
VARIANT = {
    "sigmoid": [
        dict(beta=0.3, label_smoothing=0.1),
        dict(beta=0.2, f_divergence="forward_kl"),
        dict(beta=0.2, f_divergence="js"),
        dict(beta=0.2, f_divergence="alpha", f_alpha=0.5),
    ],
    "robust": [dict(beta=0.3, label_smoothing=0.2)],
    "ipo": [dict(beta=0.5, ipo_normalize=False)],
    "hinge": [dict(beta=0.7)],
    "exo_pair": [dict(beta=0.3, label_smoothing=0.05), dict(label_smoothing=0.0)],
    "nca_pair": [dict(beta=0.4)],
    "bco_pair": [dict(beta=0.3)],
    "sppo_hard": [dict(beta=0.5)],
    "aot": [dict(beta=0.3, label_smoothing=0.1)],
    "aot_pair": [dict(beta=0.3, label_smoothing=0.1)],
    "apo_zero": [dict(beta=0.4)],
    "apo_down": [dict(beta=0.4)],
    "discopop": [dict(beta=0.05, discopop_tau=0.2)],
    "sigmoid_norm": [dict(beta=1.5)],
    "dpop": [dict(beta=0.3, dpop_lambda=5.0), dict(dpop_lambda=0.0)],
    "cal_dpo": [dict(beta=0.5)],
    "sampo": [dict(beta=0.3)],
    # ρ = 1 in every golden run (ρ < 1 draws pairs at random: test_beta_dpo_filter_*); the first
    # variant is also gradcheck's
    "beta_dpo": [dict(beta=0.3, beta_dpo_alpha=2.0, beta_dpo_rho=1.0)],
    "tr_dpo": [dict(beta=0.3, tr_alpha=1.0, tr_tau=1)],
    "sigmoid_ref_free": [dict(beta=0.3, label_smoothing=0.1)],
    "simpo": [dict(beta=2.5, gamma=0.3)],
    "alphapo": [dict(beta=2.5, gamma=0.3, alphapo_alpha=0.5), dict(alphapo_alpha=0.0), dict(alphapo_alpha=-0.5)],
    "cpo": [dict(beta=0.3, alpha=0.5)],
    "orpo": [dict(orpo_lambda=0.5)],
    "sft": [],
    "rpo": [dict(beta=0.3, rpo_alpha=0.25)],
    "mpo": [dict(beta=0.3, label_smoothing=0.1)],
    "kto": [dict(beta=0.3, desirable_weight=1.33, undesirable_weight=0.8)],
    "bco": [dict(beta=0.3)],
    "apo_zero_unpaired": [dict(beta=0.3, desirable_weight=2.0, undesirable_weight=0.5)],
}


def run(spec, d, grad=False, **kw):
    """Call spec.fn on input dict d (tensors built here); returns (out, inputs needing grad)."""
    if spec.paired:
        lc, lr = t(d["lc"]).requires_grad_(grad), t(d["lr"]).requires_grad_(grad)
        out = spec.fn(lc, lr, t(d["rc"]), t(d["rr"]), len_c=t(d["nc"]), len_r=t(d["nr"]), **kw)
        return out, (lc, lr)
    lp = t(d["lp"]).requires_grad_(grad)
    kl = None if d.get("kl") is None else t(d["kl"])
    kl_ref = None if d.get("kl_ref") is None else t(d["kl_ref"])
    out = spec.fn(lp, t(d["ref"]), torch.tensor(d["label"]), kl_logp=kl, kl_ref_logp=kl_ref, **kw)
    return out, (lp,)


# the first golden run uses the defaults, except where they draw at random (β-DPO's ρ < 1)
DEFAULT_RUN = {"beta_dpo": dict(beta_dpo_rho=1.0)}


def golden_cases():
    for name in sorted(losses.REGISTRY):
        spec = losses.REGISTRY[name]
        inputs = PAIRED_INPUTS if spec.paired else UNPAIRED_INPUTS
        for kw in [DEFAULT_RUN.get(name, {})] + VARIANT[name]:
            for k, d in enumerate(inputs):
                yield pytest.param(
                    name, d, kw, id=f"{name}-{k}-{'-'.join(f'{a}={b}' for a, b in kw.items()) or 'defaults'}"
                )


# --------------------------------------------------------------------------------------------
# (a) golden values
# --------------------------------------------------------------------------------------------


def test_every_loss_has_a_reference_and_variants():
    assert set(REFERENCE) == set(losses.REGISTRY)
    assert set(VARIANT) == set(losses.REGISTRY)


@pytest.mark.parametrize("name,d,kw", list(golden_cases()))
def test_golden(name, d, kw):
    spec = losses.get(name)
    out, _ = run(spec, d, **kw)
    want = REFERENCE[name](d, **kw)
    assert out.dtype == DT and out.shape == (len(want),)
    assert out.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_golden_reference_smoke():
    """A few values worked out by hand, so the scalar references themselves are pinned."""
    d = dict(lc=[-1.0], lr=[-2.0], rc=[-1.5], rr=[-1.0], nc=[1.0], nr=[1.0])  # Δc = .5, Δr = −1, h = 1.5
    assert ref_sigmoid(d, beta=1.0)[0] == pytest.approx(math.log1p(math.exp(-1.5)), rel=1e-15)
    assert ref_hinge(d, beta=0.5)[0] == pytest.approx(0.25, rel=1e-15)
    assert ref_ipo(d, beta=0.5, ipo_normalize=False)[0] == pytest.approx(0.25, rel=1e-15)
    assert ref_sppo_hard(d, beta=0.5)[0] == pytest.approx((0.5 - 1) ** 2 + (-1 + 1) ** 2, rel=1e-15)
    assert ref_sft(d)[0] == 1.0


@pytest.mark.parametrize("state", [(0.0, 0), (-0.3, 10)])
def test_golden_bco_with_running_state(state):
    d = PAIRED_INPUTS[0]
    st = losses.BCOState(*state)
    out, _ = run(losses.get("bco_pair"), d, beta=0.3, state=st)
    assert out.tolist() == pytest.approx(ref_bco_pair(d, beta=0.3, state=state), rel=1e-12)
    assert st.count == state[1] + 6
    du = UNPAIRED_INPUTS[0]
    st = losses.BCOState(*state)
    out, _ = run(losses.get("bco"), du, beta=0.3, state=st)
    assert out.tolist() == pytest.approx(ref_bco(du, beta=0.3, state=state), rel=1e-12)


def test_bco_state_is_running_mean():
    st = losses.BCOState()
    st.update(t([1.0, 2.0, 3.0]))
    st.update(t([10.0]))
    assert st.mean == pytest.approx(4.0) and st.count == 4
    st.update(t([]))
    assert st.count == 4


def test_kto_without_kl_uses_zero_reference_point():
    d = dict(UNPAIRED_INPUTS[0], kl=None, kl_ref=None)
    out, _ = run(losses.get("kto"), d, beta=0.3)
    assert out.tolist() == pytest.approx(ref_kto(d, beta=0.3), rel=1e-12)
    # and with z0 = 0, KTO and unpaired APO-zero coincide on desirable examples
    apo, _ = run(losses.get("apo_zero_unpaired"), d, beta=0.3)
    assert out[0].item() == pytest.approx(apo[0].item(), rel=1e-12)


def test_f_log_ratio_golden():
    lp, rp = t([-2.0, -5.0, -1.0]), t([-2.5, -4.0, -1.0])
    for div, a in [("reverse_kl", 1.0), ("forward_kl", 1.0), ("js", 1.0), ("alpha", 0.5), ("alpha", 2.0)]:
        got = losses.f_log_ratio(lp, rp, div, a).tolist()
        want = [f_prime(x - y, div, a) for x, y in zip(lp.tolist(), rp.tolist())]
        assert got == pytest.approx(want, rel=1e-12, abs=1e-14), div
    with pytest.raises(ValueError):
        losses.f_log_ratio(lp, rp, "hellinger")
    with pytest.raises(ValueError):
        losses.f_log_ratio(lp, rp, "alpha", 0.0)
    # extreme ratios stay finite
    assert torch.isfinite(losses.f_log_ratio(t([-2000.0]), t([0.0]), "forward_kl")).all()


def test_log1mexp_accuracy():
    for m in [-1e-12, -1e-6, -0.1, -0.69, -0.7, -1.0, -5.0, -40.0, -800.0]:
        want = math.log(-math.expm1(m)) if m > -0.6931 else math.log1p(-math.exp(m))
        assert losses.log1mexp(t([m])).item() == pytest.approx(want, rel=1e-14, abs=1e-300)


def test_orpo_stable_near_certain_and_impossible_tokens():
    # m = logp/len → 0 (a response the model is sure of) and m → −∞ both stay finite
    lc, lr = t([-1e-9, -2000.0]), t([-3.0, -1e-10])
    n = t([1.0, 1.0])
    out = losses.orpo(lc, lr, len_c=n, len_r=n)
    assert torch.isfinite(out).all()


def test_discopop_finite_for_extreme_margins():
    z = t([0.0, 0.0])
    out = losses.discopop(t([-5000.0, 5000.0]), z, z, z, beta=1.0)
    assert torch.isfinite(out).all()
    assert out[1].item() == pytest.approx(0.0, abs=1e-300)


def test_wpo_weights_golden():
    lc, lr, nc, nr = t([-2.0, -30.0]), t([-3.0, -1.0]), t([4.0, 10.0]), t([3.0, 2.0])
    w = losses.wpo_weights(lc.requires_grad_(), lr, nc, nr)
    want = [min(1.0, math.exp(-2.0 / 4 + -3.0 / 3)), min(1.0, math.exp(-30.0 / 10 + -1.0 / 2))]
    assert w.tolist() == pytest.approx(want, rel=1e-12)
    assert not w.requires_grad
    sq_c, sq_r = t([-1.0, -2.0]), t([-0.5, -0.25])  # Σ_t log Σ_v π², the "alignment" correction
    w2 = losses.wpo_weights(lc, lr, nc, nr, sq_mass_c=sq_c, sq_mass_r=sq_r, clamp_max=None)
    want2 = [math.exp((-2.0 + 1.0) / 4 + (-3.0 + 0.5) / 3), math.exp((-30.0 + 2.0) / 10 + (-1.0 + 0.25) / 2)]
    assert w2.tolist() == pytest.approx(want2, rel=1e-12)


def test_ld_logps_golden():
    got = losses.ld_logps(t([-4.0, -7.5]), t([-6.0, 0.0]), 0.3)
    assert got.tolist() == pytest.approx([-4.0 - 1.8, -7.5], rel=1e-15)
    assert losses.ld_logps(t([-4.0]), t([-6.0]), 1.0).item() == -10.0  # α = 1: plain log-prob


# --------------------------------------------------------------------------------------------
# (b) gradcheck
# --------------------------------------------------------------------------------------------


class FrozenState(losses.BCOState):
    """δ held fixed, as the detached running mean is for the gradient."""

    def update(self, rewards):
        return self.mean


class FrozenBetaState(losses.BetaDPOState):
    """M0 and σ held fixed (gradcheck calls the loss many times; a running state would move)."""

    def update(self, margins):
        return self.mean


FROZEN = {
    losses.BCOState: lambda: FrozenState(mean=-0.05, count=3),
    losses.BetaDPOState: lambda: FrozenBetaState(mean=-0.05, std=0.7, count=3),
}


# β-DPO's β_b depends on the batch's margins through a detached mean, which finite differences
# see: gradcheck runs it with α = 0 (β_b = β0); test_beta_dpo_analytic_gradient covers α ≠ 0
GRADCHECK_KW = {"beta_dpo": dict(beta=0.3, beta_dpo_alpha=0.0, beta_dpo_rho=1.0)}


@pytest.mark.parametrize("name", sorted(losses.REGISTRY))
@pytest.mark.parametrize("k", [0, 1])
def test_gradcheck(name, k):
    spec = losses.get(name)
    d = (PAIRED_INPUTS if spec.paired else UNPAIRED_INPUTS)[k]
    kw = dict(GRADCHECK_KW.get(name) or (VARIANT[name][0] if VARIANT[name] else {}))
    if spec.stateful:
        kw["state"] = FROZEN[spec.state_class]()
    if spec.paired:
        rc, rr, nc, nr = t(d["rc"]), t(d["rr"]), t(d["nc"]), t(d["nr"])

        def f(lc, lr):
            return spec.fn(lc, lr, rc, rr, len_c=nc, len_r=nr, **kw)

        args = (t(d["lc"]).requires_grad_(), t(d["lr"]).requires_grad_())
    else:
        ref, label = t(d["ref"]), torch.tensor(d["label"])
        kl, kl_ref = t(d["kl"]), t(d["kl_ref"])

        def f(lp):
            return spec.fn(lp, ref, label, kl_logp=kl, kl_ref_logp=kl_ref, **kw)

        args = (t(d["lp"]).requires_grad_(),)
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-6)


def test_bco_delta_is_detached():
    """With state=None δ is the batch mean, but no gradient flows through it."""
    d = PAIRED_INPUTS[0]
    out, (lc, lr) = run(losses.get("bco_pair"), d, grad=True, beta=0.3)
    g_c, g_r = torch.autograd.grad(out.sum(), (lc, lr))
    delta = mean(
        [0.3 * (d["lc"][i] - d["rc"][i]) for i in range(3)] + [0.3 * (d["lr"][i] - d["rr"][i]) for i in range(3)]
    )
    for i in range(3):
        rc = 0.3 * (d["lc"][i] - d["rc"][i])
        rr = 0.3 * (d["lr"][i] - d["rr"][i])
        assert g_c[i].item() == pytest.approx(-0.3 * (1 - sig(rc - delta)), rel=1e-12)
        assert g_r[i].item() == pytest.approx(0.3 * sig(rr - delta), rel=1e-12)


# --------------------------------------------------------------------------------------------
# (c) analytic gradients: DPO, β-DPO (β_b held fixed), DPOP, Cal-DPO
# --------------------------------------------------------------------------------------------


def test_beta_dpo_analytic_gradient():
    """β_b is detached: ∂L_i/∂logp_c,i = −(B/k)·β_b·σ(−β_b·h_i) = −∂L_i/∂logp_r,i for a kept pair,
    0 for a dropped one (here, ρ = 1, all kept)."""
    d = PAIRED_INPUTS[0]
    st = losses.BetaDPOState(mean=-0.3, std=0.4, count=5)
    out, (lc, lr) = run(losses.get("beta_dpo"), d, grad=True, beta=0.3, beta_dpo_alpha=2.0, beta_dpo_rho=1.0, state=st)
    g_c, g_r = torch.autograd.grad(out.sum(), (lc, lr))
    h = [_h(d, i) for i in pairs(d)]
    b = 0.3 * (1 + 2.0 * (mean(h) - st.mean))
    for i in pairs(d):
        assert g_c[i].item() == pytest.approx(-b * sig(-b * h[i]), rel=1e-12)
        assert g_r[i].item() == pytest.approx(b * sig(-b * h[i]), rel=1e-12)


def test_dpop_and_cal_dpo_analytic_gradients():
    """DPOP, x = β(h − λ·max(0, −Δ_c)): ∂L/∂logp_c = −σ(−x)·β·(1 + λ·[Δ_c < 0]), ∂L/∂logp_r = σ(−x)·β.
    Cal-DPO: ∂L/∂logp_c = −σ(−h) + 2(Δ_c − 1/(2β)), ∂L/∂logp_r = σ(−h) + 2(Δ_r + 1/(2β))."""
    d = PAIRED_INPUTS[0]
    out, (lc, lr) = run(losses.get("dpop"), d, grad=True, beta=0.3, dpop_lambda=5.0)
    g_c, g_r = torch.autograd.grad(out.sum(), (lc, lr))
    for i in pairs(d):
        dc = d["lc"][i] - d["rc"][i]
        x = 0.3 * (_h(d, i) - 5.0 * max(0.0, -dc))
        assert g_c[i].item() == pytest.approx(-sig(-x) * 0.3 * (1 + (5.0 if dc < 0 else 0.0)), rel=1e-12)
        assert g_r[i].item() == pytest.approx(sig(-x) * 0.3, rel=1e-12)
    out, (lc, lr) = run(losses.get("cal_dpo"), d, grad=True, beta=0.5)
    g_c, g_r = torch.autograd.grad(out.sum(), (lc, lr))
    for i in pairs(d):
        dc, dr = d["lc"][i] - d["rc"][i], d["lr"][i] - d["rr"][i]
        assert g_c[i].item() == pytest.approx(-sig(-(dc - dr)) + 2 * (dc - 1.0), rel=1e-12)
        assert g_r[i].item() == pytest.approx(sig(-(dc - dr)) + 2 * (dr + 1.0), rel=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_analytic_gradient(beta):
    for d in PAIRED_INPUTS:
        out, (lc, lr) = run(losses.get("dpo"), d, grad=True, beta=beta)
        g_c, g_r = torch.autograd.grad(out.sum(), (lc, lr))
        for i in pairs(d):
            s = 1 - sig(beta * _h(d, i))  # = σ(−βh)
            assert g_c[i].item() == pytest.approx(-beta * s, rel=1e-12)
            assert g_r[i].item() == pytest.approx(+beta * s, rel=1e-12)


# --------------------------------------------------------------------------------------------
# (d) registry
# --------------------------------------------------------------------------------------------

REFERENCE_FREE = {"simpo", "alphapo", "cpo", "orpo", "sigmoid_ref_free", "sft"}
UNPAIRED = {"kto", "bco", "apo_zero_unpaired"}
# raise without len_c/len_r
NEEDS_LENGTHS = {"ipo", "sigmoid_norm", "simpo", "alphapo", "cpo", "orpo", "sft", "rpo", "mpo"}
PER_TOKEN_REWARD = {"ipo", "sigmoid_norm", "simpo", "alphapo"}  # ipo: with its default ipo_normalize
KL_BASELINE = {"kto"}
ORDER_STATISTICS = {"aot", "aot_pair"}
STATE_CLASS = {
    "bco_pair": losses.BCOState,
    "bco": losses.BCOState,
    "mpo": losses.BCOState,
    "beta_dpo": losses.BetaDPOState,
}
STATEFUL = set(STATE_CLASS)
TOKEN_SUBSET = {"sampo": "sample"}
MOVING_REFERENCE = {"tr_dpo"}
REQUIRED = {
    "sigmoid",
    "robust",
    "ipo",
    "hinge",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_pair",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "simpo",
    "cpo",
    "orpo",
    "sigmoid_ref_free",
    "kto",
    "bco",
    "apo_zero_unpaired",
    "rpo",
    "mpo",
    "dpop",
    "cal_dpo",
    "sampo",
    "beta_dpo",
    "tr_dpo",
    "alphapo",
}
CONFIG_KEYS = {
    "beta",
    "label_smoothing",
    "gamma",
    "alpha",
    "orpo_lambda",
    "desirable_weight",
    "undesirable_weight",
    "ipo_normalize",
    "f_divergence",
    "f_alpha",
    "ld_alpha",
    "rpo_alpha",
    "discopop_tau",
    "dpop_lambda",
    "beta_dpo_alpha",
    "beta_dpo_rho",
    "tr_alpha",
    "tr_tau",
    "alphapo_alpha",
}


def test_registry_declarations():
    assert REQUIRED <= set(losses.REGISTRY)
    for name, spec in losses.REGISTRY.items():
        assert spec.name == name
        assert spec.needs_reference == (name not in REFERENCE_FREE), name
        assert spec.paired == (name not in UNPAIRED), name
        assert spec.reward_is_per_token() == (name in PER_TOKEN_REWARD), name
        assert spec.kl_baseline == (name in KL_BASELINE), name
        assert spec.per_pair == (name not in ORDER_STATISTICS), name
        assert spec.stateful == (name in STATEFUL), name
        assert spec.state_class is STATE_CLASS.get(name), name
        assert spec.token_subset == TOKEN_SUBSET.get(name), name
        assert spec.moving_reference == (name in MOVING_REFERENCE), name
        assert isinstance(spec.hyperparameters, dict)
        assert set(spec.hyperparameters) <= CONFIG_KEYS, name  # LossConfig's names, nothing else
        assert spec.fn.__doc__, name  # the formula


def test_get_aliases_and_errors():
    assert losses.get("dpo") is losses.get("sigmoid")
    assert losses.get("cdpo") is losses.get("sigmoid")
    assert losses.get("slic") is losses.get("hinge")
    assert losses.get("rdpo") is losses.get("robust")
    for alias, target in losses.ALIASES.items():
        assert target in losses.REGISTRY and alias not in losses.REGISTRY
    with pytest.raises(KeyError, match="unknown loss 'nope'"):
        losses.get("nope")
    with pytest.raises(KeyError):
        losses.get("")


def test_names_filters():
    assert losses.names() == sorted(losses.REGISTRY)
    assert set(losses.names(paired=False)) == UNPAIRED
    assert set(losses.names(needs_reference=False)) == REFERENCE_FREE
    assert set(losses.names(paired=True, needs_reference=False)) == REFERENCE_FREE
    assert losses.names(paired=False, needs_reference=False) == []


@pytest.mark.parametrize("name", sorted(losses.REGISTRY))
def test_hyperparameters_accepted_and_defaults_match(name):
    spec = losses.get(name)
    d = (PAIRED_INPUTS if spec.paired else UNPAIRED_INPUTS)[0]
    torch.manual_seed(0)  # β-DPO's default ρ < 1 draws pairs: the same draw both times
    out, _ = run(spec, d, **spec.hyperparameters)
    assert out.shape == (len(d["lc"] if spec.paired else d["lp"]),) and torch.isfinite(out).all()
    torch.manual_seed(0)
    default_out, _ = run(spec, d)
    assert torch.equal(out, default_out)  # the declared defaults are the fn's defaults
    params = inspect.signature(spec.fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        for k, v in spec.hyperparameters.items():
            assert params[k].kind is inspect.Parameter.KEYWORD_ONLY and params[k].default == v, (name, k)
    with pytest.raises(TypeError):
        run(spec, d, not_a_hyperparameter=1.0)


@pytest.mark.parametrize("name", sorted(set(losses.REGISTRY) - REFERENCE_FREE - UNPAIRED))
def test_reference_losses_refuse_missing_reference(name):
    spec = losses.get(name)
    d = PAIRED_INPUTS[0]
    with pytest.raises(ValueError, match="ref"):
        spec.fn(t(d["lc"]), t(d["lr"]), len_c=t(d["nc"]), len_r=t(d["nr"]))


@pytest.mark.parametrize("name", sorted(NEEDS_LENGTHS))
def test_length_losses_refuse_missing_lengths(name):
    spec = losses.get(name)
    d = PAIRED_INPUTS[0]
    with pytest.raises(ValueError, match="len"):
        spec.fn(t(d["lc"]), t(d["lr"]), t(d["rc"]), t(d["rr"]))


@pytest.mark.parametrize("name", sorted(REFERENCE_FREE))
def test_reference_free_ignore_reference(name):
    spec = losses.get(name)
    d = PAIRED_INPUTS[0]
    a = spec.fn(t(d["lc"]), t(d["lr"]), len_c=t(d["nc"]), len_r=t(d["nr"]))
    b = spec.fn(t(d["lc"]), t(d["lr"]), t(d["rc"]) - 3, t(d["rr"]) + 1, len_c=t(d["nc"]), len_r=t(d["nr"]))
    assert torch.equal(a, b)


def test_sigmoid_keeps_its_old_call():
    d = PAIRED_INPUTS[0]
    out = losses.sigmoid(t(d["lc"]), t(d["lr"]), t(d["rc"]), t(d["rr"]), beta=0.1)
    assert out.tolist() == pytest.approx(ref_sigmoid(d, beta=0.1), rel=1e-12)
    out = losses.REGISTRY["sigmoid"].fn(t(d["lc"]), t(d["lr"]), t(d["rc"]), t(d["rr"]), beta=0.1, label_smoothing=0.2)
    assert out.tolist() == pytest.approx(ref_sigmoid(d, beta=0.1, label_smoothing=0.2), rel=1e-12)


def test_robust_rejects_bad_flip_rate():
    d = PAIRED_INPUTS[0]
    with pytest.raises(ValueError):
        run(losses.get("robust"), d, label_smoothing=0.5)


def test_with_nll_and_combine():
    d = PAIRED_INPUTS[1]
    fn = losses.with_nll(losses.hinge, rpo_alpha=0.5)
    assert inspect.signature(fn).parameters["rpo_alpha"].default == 0.5
    out, _ = run(losses.LossSpec("x", fn), d, beta=0.3)
    want = [a + 0.5 * b for a, b in zip(ref_hinge(d, beta=0.3), ref_sft(d))]
    assert out.tolist() == pytest.approx(want, rel=1e-12)

    spec = losses.combine([("ipo", 0.5), ("simpo", 2.0)])
    assert spec.paired and spec.needs_reference and spec.per_pair
    assert set(spec.hyperparameters) == {"beta", "ipo_normalize", "gamma"}
    out, _ = run(spec, d, beta=0.7, gamma=0.2)
    want = [0.5 * a + 2.0 * b for a, b in zip(ref_ipo(d, beta=0.7), ref_simpo(d, beta=0.7, gamma=0.2))]
    assert out.tolist() == pytest.approx(want, rel=1e-12)
    free = losses.combine([(losses.get("sft"), 1.0), ("orpo", 1.0)], name="free")
    assert free.name == "free" and not free.needs_reference
    with pytest.raises(ValueError):
        losses.combine([("kto", 1.0)])
    with pytest.raises(ValueError):
        losses.combine([])
    with pytest.raises(TypeError):
        spec.fn(t(d["lc"]), t(d["lr"]), t(d["rc"]), t(d["rr"]), len_c=t(d["nc"]), len_r=t(d["nr"]), orpo_lambda=1)


# --------------------------------------------------------------------------------------------
# (e) loss states, β-DPO's filter, SamPO's subsets, TR-DPO's reference update, AlphaPO's limit
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [(0.0, None, 0, 0.9), (-0.3, 0.4, 5, 0.9), (1.2, 2.0, 2, 0.5)])
def test_golden_beta_dpo_with_running_state(state):
    """M0 and σ from the state, folded with this batch first; the last state drives β_b below its
    floor (β0·(1 + 2·(0.2 − 0.7)) = 0 → 1e-3)."""
    d = PAIRED_INPUTS[0]
    st = losses.BetaDPOState(*state)
    kw = dict(beta=0.3, beta_dpo_alpha=2.0, beta_dpo_rho=1.0)
    out, _ = run(losses.get("beta_dpo"), d, state=st, **kw)
    assert out.tolist() == pytest.approx(ref_beta_dpo(d, state=state, **kw), rel=1e-12)
    m0, sd = _beta_dpo_fold([_h(d, i) for i in pairs(d)], state)
    assert st.mean == pytest.approx(m0, rel=1e-12) and st.std == pytest.approx(sd, rel=1e-12)
    assert st.count == state[2] + 1


def _beta_dpo_batch(h):
    """Pairs with margins h (Δ_r = 0)."""
    z = t([0.0] * len(h))
    return t(h), z, z, z


def test_beta_dpo_filter_drops_the_outlier_and_rescales():
    """5 pairs, ρ = 0.8: 4 kept. Against a state with M0 ≈ 0.13, σ ≈ 0.28 the pair with margin 40
    is ~140σ out: its weight is ~exp(−10⁴) (floored at 1e-300), so it is the one dropped, for any
    seed. The kept losses are scaled by 5/4, so the batch mean is the mean over the kept pairs."""
    h = [0.1, -0.1, 0.0, 0.2, 40.0]
    beta, alpha = 0.2, 0.6
    for seed in range(10):
        st = losses.BetaDPOState(mean=0.05, std=0.1, count=100, momentum=0.99)
        torch.manual_seed(seed)
        out = losses.beta_dpo(*_beta_dpo_batch(h), beta=beta, beta_dpo_alpha=alpha, beta_dpo_rho=0.8, state=st)
        m0 = 0.99 * 0.05 + 0.01 * mean(h)
        sd = 0.99 * 0.1 + 0.01 * math.sqrt(sum((x - mean(h)) ** 2 for x in h) / 4)
        assert st.mean == pytest.approx(m0, rel=1e-12) and st.std == pytest.approx(sd, rel=1e-12)
        b = beta * (1 + alpha * (mean(h[:4]) - m0))
        want = [5 / 4 * -logsig(b * x) for x in h[:4]] + [0.0]
        assert out.tolist() == pytest.approx(want, rel=1e-12, abs=0)
        assert out.mean().item() == pytest.approx(mean([-logsig(b * x) for x in h[:4]]), rel=1e-12)


def test_beta_dpo_filter_draw_is_the_gaussian_weighted_one():
    """k = ⌊0.6·5⌋ = 3 of 5 pairs, drawn without replacement with p_i ∝ exp(−(M_i − M0)²/(2σ²)),
    M0 and σ of this batch (state=None). The mask equals torch.multinomial on the hand-computed
    weights under the same seed; a seed reproduces the draw; different seeds draw differently."""
    h = [0.3, -1.1, 0.8, 2.5, 0.0]
    m0 = mean(h)
    sd = math.sqrt(sum((x - m0) ** 2 for x in h) / 4)
    z = [-0.5 * ((x - m0) / sd) ** 2 for x in h]
    w = t([math.exp(v - max(z)) for v in z])
    masks = set()
    for seed in range(30):
        torch.manual_seed(seed)
        want = torch.zeros(5, dtype=torch.bool)
        want[torch.multinomial(w, 3, replacement=False)] = True
        torch.manual_seed(seed)
        out = losses.beta_dpo(*_beta_dpo_batch(h), beta=0.1, beta_dpo_rho=0.6)
        kept = out != 0
        assert torch.equal(kept, want), seed
        b = 0.1 * (1 + 0.6 * (mean([x for x, k in zip(h, want.tolist()) if k]) - m0))
        assert out[kept].tolist() == pytest.approx([5 / 3 * -logsig(b * x) for x in t(h)[kept].tolist()], rel=1e-12)
        torch.manual_seed(seed)
        again = losses.beta_dpo(*_beta_dpo_batch(h), beta=0.1, beta_dpo_rho=0.6)
        assert torch.equal(out, again)
        masks.add(tuple(kept.tolist()))
    assert len(masks) > 3
    for rho in (0.0, 1.5):
        with pytest.raises(ValueError, match="beta_dpo_rho"):
            losses.beta_dpo(*_beta_dpo_batch(h), beta_dpo_rho=rho)


def test_beta_dpo_single_pair_and_no_spread():
    """A batch of one pair is kept (k ≥ 1) and gives its DPO loss; with σ unknown the draw is uniform."""
    out = losses.beta_dpo(*_beta_dpo_batch([0.7]), beta=0.5)
    assert out.tolist() == pytest.approx([-logsig(0.5 * 0.7)], rel=1e-12)
    st = losses.BetaDPOState()
    losses.beta_dpo(*_beta_dpo_batch([0.7]), state=st)
    assert st.std is None and st.mean == pytest.approx(0.7) and st.count == 1
    torch.manual_seed(0)
    out = losses.beta_dpo(*_beta_dpo_batch([1.0, 1.0, 1.0]), beta=0.5, beta_dpo_rho=0.5)  # σ = 0
    assert int((out != 0).sum()) == 1


def test_loss_states_save_restore_copy_and_gather():
    for st in (losses.BCOState(0.5, 3), losses.BetaDPOState(0.2, 0.3, 4, 0.8), losses.BetaDPOState()):
        assert isinstance(st, losses.LossState)
        saved = json.loads(json.dumps(st.to_dict()))  # JSON-able
        fresh = type(st)()
        fresh.load_dict(saved)
        assert fresh.to_dict() == st.to_dict()
        other = st.copy()
        other.update(t([1.0, 2.0, 4.0]))
        assert other.to_dict() != st.to_dict() and fresh.to_dict() == st.to_dict()
    # `gather` is applied first: here it stands for two processes with batches x and 3x
    bco = losses.BCOState()
    bco.gather = lambda x: torch.cat([x, 3 * x])
    bco.update(t([1.0, 2.0]))
    assert bco.mean == pytest.approx(3.0) and bco.count == 4  # mean of [1, 2, 3, 6]
    beta = losses.BetaDPOState()
    beta.gather = lambda x: torch.cat([x, 3 * x])
    beta.update(t([1.0, 2.0]))
    assert beta.mean == pytest.approx(3.0) and beta.std == pytest.approx(math.sqrt(14 / 3))
    assert beta.copy().gather is beta.gather
    assert repr(losses.BCOState(0.25, 2)) == "BCOState(mean=0.25, count=2)"
    with pytest.raises(ValueError, match="momentum"):
        losses.BetaDPOState(momentum=1.0)


def test_combine_refuses_mixed_states_and_subsets():
    with pytest.raises(ValueError, match="state"):
        losses.combine([("bco_pair", 1.0), ("beta_dpo", 1.0)])
    with pytest.raises(ValueError, match="token subset"):
        losses.combine([("sampo", 1.0), ("sigmoid", 1.0)])
    spec = losses.combine([("beta_dpo", 1.0), ("sigmoid", 0.5)])
    assert spec.state_class is losses.BetaDPOState and spec.stateful
    assert losses.get("mpo").state_class is losses.BCOState
    tr = losses.combine([("tr_dpo", 1.0), ("sft", 1.0)])
    assert tr.moving_reference and tr.token_subset is None and not tr.stateful
    assert losses.combine([("sampo", 1.0), ("sampo", 0.5)]).token_subset == "sample"
    d = PAIRED_INPUTS[0]
    st = losses.BetaDPOState()
    out, _ = run(spec, d, beta=0.3, beta_dpo_rho=1.0, state=st)
    want = [
        a + 0.5 * b
        for a, b in zip(
            ref_beta_dpo(d, beta=0.3, beta_dpo_rho=1.0, state=(0.0, None, 0, 0.9)), ref_sigmoid(d, beta=0.3)
        )
    ]
    assert out.tolist() == pytest.approx(want, rel=1e-12) and st.count == 1


@pytest.mark.parametrize("n_c,n_r", [(5, 3), (3, 5), (4, 4), (7, 0), (1, 9)])
def test_sampo_positions_counts_and_determinism(n_c, n_r):
    kc, kr = losses.sampo_positions(n_c, n_r, seed=123)
    t_m = min(n_c, n_r)
    assert len(kc) == len(kr) == t_m
    assert kc == sorted(set(kc)) and kr == sorted(set(kr))
    assert all(0 <= i < n_c for i in kc) and all(0 <= i < n_r for i in kr)
    assert (kc if n_c <= n_r else kr) == list(range(t_m))  # the shorter keeps every token
    assert losses.sampo_positions(n_c, n_r, seed=123) == (kc, kr)


def test_sampo_positions_uniform():
    """Each position of the longer response is kept with probability T_m/T = 3/8: over 4000 seeds
    every count is within 5 binomial standard deviations (≈ 31) of 1500; the subsets vary."""
    counts = [0] * 8
    subsets = set()
    for seed in range(4000):
        kc, kr = losses.sampo_positions(8, 3, seed)
        assert kr == [0, 1, 2]
        for i in kc:
            counts[i] += 1
        subsets.add(tuple(kc))
    assert all(abs(c - 1500) < 5 * math.sqrt(4000 * 3 / 8 * 5 / 8) for c in counts), counts
    assert len(subsets) == math.comb(8, 3)
    with pytest.raises(ValueError):
        losses.sampo_positions(-1, 3, 0)


def test_mix_reference_is_the_tr_dpo_update():
    ref, pol = t([1.0, -2.0, 0.5]), t([3.0, 0.0, 0.5])
    got = losses.mix_reference(ref, pol, 0.6)
    assert got.tolist() == pytest.approx([0.6 * 3 + 0.4 * 1, 0.4 * -2.0, 0.5], rel=1e-15)
    assert torch.equal(losses.mix_reference(ref, pol, 1.0), pol)  # α = 1: a hard copy
    assert not losses.mix_reference(ref, pol.clone().requires_grad_(), 0.5).requires_grad
    assert losses.mix_reference(ref.float(), pol, 0.5).dtype == torch.float32  # the reference's dtype
    for a in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            losses.mix_reference(ref, pol, a)


@pytest.mark.parametrize("kw", [dict(tr_alpha=0.0), dict(tr_alpha=1.5), dict(tr_tau=0), dict(tr_tau=2.5)])
def test_tr_dpo_checks_its_schedule(kw):
    with pytest.raises(ValueError, match="tr_"):
        run(losses.get("tr_dpo"), PAIRED_INPUTS[0], **kw)


def test_alphapo_limits():
    """α = 0 is SimPO exactly; a tiny α is SimPO to first order; extreme log-probs stay finite."""
    d = PAIRED_INPUTS[0]
    simpo, _ = run(losses.get("simpo"), d, beta=2.5, gamma=0.3)
    exact, _ = run(losses.get("alphapo"), d, beta=2.5, gamma=0.3, alphapo_alpha=0.0)
    assert torch.equal(exact, simpo)
    near, _ = run(losses.get("alphapo"), d, beta=2.5, gamma=0.3, alphapo_alpha=1e-7)
    assert near.tolist() == pytest.approx(simpo.tolist(), rel=1e-5)
    one = t([1.0])
    for dtype in (torch.float64, torch.float32):
        out = losses.alphapo(t([-5000.0]).to(dtype), t([-1.0]).to(dtype), len_c=one, len_r=one, alphapo_alpha=0.5)
        assert torch.isfinite(out).all()


def test_dpop_penalty_only_below_the_reference():
    """λ = 0 is DPO; the penalty acts only on pairs whose chosen log-ratio is negative."""
    d = PAIRED_INPUTS[0]  # Δ_c = 0.3, −0.5, 0.45
    plain, _ = run(losses.get("dpop"), d, dpop_lambda=0.0)
    assert plain.tolist() == pytest.approx(ref_sigmoid(d), rel=1e-12)
    pen, _ = run(losses.get("dpop"), d)
    assert pen[0] == plain[0] and pen[2] == plain[2] and pen[1] > plain[1]
