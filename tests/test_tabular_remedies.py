"""Exact problems for the remedies of DPO's failure modes: what DPOP, Cal-DPO, SamPO, β-DPO and
TR-DPO converge to, with no sampling and no model (the setting of test_tabular.py: exact population
losses, L-BFGS or plain gradient descent in float64; β = 0.5 throughout).

1. Likelihood displacement (DPOP, Cal-DPO). Three responses with a shared feature x = 0, 1, 2 and
   a log-linear policy π_θ(y) ∝ π_ref(y)·exp(θ·x_y), π_ref = [0.45, 0.45, 0.10]. The data holds only
   the pair (x=1, x=0); x=1 wins with P = 0.9. DPO's optimum θ* = logit(P)/β pushes the mass to the
   unseen x=2 and the chosen response falls from 0.45 to 0.05; DPOP and Cal-DPO keep it.
2. Cal-DPO's calibration: a softmax over three responses with data on one pair (a, b) only, so
   g = log π − log π_ref is free on a and b. The stationary condition (derived in the test) is
   g_a = −g_b = d/2 with σ(d) + d = P + (2P − 1)/β: finite even for unanimous labels (P = 1).
3. DPOP on the five-response problem of test_tabular.py: with λ = 50 π_ref is the minimiser.
4. Length (SamPO): responses are a length token ℓ ∈ {1..4} then ℓ content tokens g/n; labels are
   Bradley–Terry on the per-token quality (#g − #n)/ℓ, not on length. DPO's summed log-ratios make
   its optimum longer; SamPO's (exact expectation over its token subsets) stays.
5. β-DPO: full-batch updates with ρ = 1: the running threshold M0 meets the batch mean M, β_b → β0,
   and the policy reaches DPO's optimum.
6. TR-DPO: the reference moves (mix_reference on the bandit's logits); the policy drifts further
   from the original reference than DPO's optimum, without a fixed point.

Run with `pytest -s` to print the summary table.
"""

from __future__ import annotations

import math

import pytest
import test_tabular as tab
import torch

from prefopt import losses

DT = torch.float64
BETA = tab.BETA
ROWS: list[tuple[str, str, str]] = []  # (problem / loss, a measure, outcome)


@pytest.fixture(scope="module", autouse=True)
def _setup_and_table():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors
    yield
    torch.set_num_threads(threads)
    tab.print_table("tabular remedies (β = 0.5)", ROWS)


t, minimise = tab.t, tab.minimise


# --------------------------------------------------------------------------------------------
# 1. likelihood displacement: DPO lowers the chosen response, DPOP and Cal-DPO keep it
# --------------------------------------------------------------------------------------------

X = t([0.0, 1.0, 2.0])
DISP_REF = t([0.45, 0.45, 0.10])
P_DISP = 0.9
CHOSEN = 1


def disp_logp(theta):
    return torch.log_softmax(DISP_REF.log() + theta[0] * X, 0)


def disp_population(name, **kw):
    """θ ↦ exact loss over the labels of the pair (1, 0): 1 wins w.p. P, 0 w.p. 1 − P."""
    spec = losses.get(name)
    lref = DISP_REF.log()
    win, lose = [1, 0], [0, 1]
    w, one = t([P_DISP, 1 - P_DISP]), torch.ones(2, dtype=DT)

    def loss(theta):
        lp = disp_logp(theta)
        return (w * spec.fn(lp[win], lp[lose], lref[win], lref[lose], len_c=one, len_r=one, beta=BETA, **kw)).sum()

    return loss


def test_displacement_dpop_and_cal_dpo_keep_the_chosen_response():
    theta_dpo = minimise(disp_population("sigmoid"), torch.zeros(1, dtype=DT))
    assert abs(float(theta_dpo[0]) - math.log(P_DISP / (1 - P_DISP)) / BETA) < 1e-6  # θ* = logit P / β
    pi_dpo = disp_logp(theta_dpo).exp()
    ROWS.append(
        (
            "displacement: sigmoid (DPO)",
            f"θ={float(theta_dpo[0]):.3f}",
            f"π(chosen) {DISP_REF[CHOSEN]:.2f}→{pi_dpo[CHOSEN]:.3f}, π {tab.fmt(pi_dpo)}",
        )
    )
    assert pi_dpo[CHOSEN] < DISP_REF[CHOSEN] - 0.3  # the failure: the preferred response loses mass
    results = {}
    for label, name, kw in [
        ("dpop λ=50", "dpop", {}),
        ("dpop λ=5", "dpop", {"dpop_lambda": 5.0}),
        ("cal_dpo", "cal_dpo", {}),
    ]:
        # from both sides of π_ref, to show it is the minimum and not the starting point
        thetas = [minimise(disp_population(name, **kw), t([x0])) for x0 in (0.0, 1.0, -1.0)]
        assert max(abs(float(a[0] - b[0])) for a in thetas for b in thetas) < 1e-6, (label, thetas)
        pi = disp_logp(thetas[0]).exp()
        results[label] = (float(thetas[0][0]), pi)
        ROWS.append(
            (
                f"displacement: {label}",
                f"θ={float(thetas[0][0]):.3f}",
                f"π(chosen) {DISP_REF[CHOSEN]:.2f}→{pi[CHOSEN]:.3f}, KL(π*_DPO‖π) {tab.kl(pi_dpo, pi):.3f}, "
                f"π {tab.fmt(pi)}",
            )
        )
    # DPOP with λ = 50: the flipped labels (0 chosen w.p. 0.1) put the penalty's kink at θ = 0
    assert abs(results["dpop λ=50"][0]) < 1e-8
    for label in ("dpop λ=5", "cal_dpo"):  # move towards the preferred response, and keep it
        theta, pi = results[label]
        assert theta > 0.3 and pi[CHOSEN] > DISP_REF[CHOSEN] + 0.03, label


# --------------------------------------------------------------------------------------------
# 2. Cal-DPO's calibration targets: the stationary condition on one pair
# --------------------------------------------------------------------------------------------


def _solve_increasing(f, target, lo, hi):
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("p", [0.9, 1.0])
def test_cal_dpo_calibration_condition(p):
    """Softmax over (a, b, other), π_ref = [0.3, 0.3, 0.4], data on the pair (a, b) only, a wins
    w.p. P. With c = 1/(2β) the expected loss is
        −P log σ(d) − (1−P) log σ(−d) + P[(g_a − c)² + (g_b + c)²] + (1−P)[(g_b − c)² + (g_a + c)²],
    d = g_a − g_b, and g_a, g_b are free (the other response takes the rest of the mass). Its
    gradient vanishes where ∂g_a + ∂g_b: 2(g_a + g_b) = 0 and ∂g_a − ∂g_b:
    2(σ(d) − P) + 2d − 4c(2P − 1) = 0, i.e. g_a = −g_b = d/2 with σ(d) + d = P + (2P − 1)/β.
    DPO has no minimiser for P = 1; Cal-DPO's is finite."""
    pref = t([0.3, 0.3, 0.4])
    spec = losses.get("cal_dpo")
    win, lose = [0, 1], [1, 0]
    w, one = t([p, 1 - p]), torch.ones(2, dtype=DT)

    def loss(theta):
        lp = torch.log_softmax(theta, 0)
        lr = pref.log()
        return (w * spec.fn(lp[win], lp[lose], lr[win], lr[lose], len_c=one, len_r=one, beta=BETA)).sum()

    pi = torch.softmax(minimise(loss, pref.log()), 0)
    g = pi.log() - pref.log()
    d = _solve_increasing(lambda x: 1 / (1 + math.exp(-x)) + x, p + (2 * p - 1) / BETA, -50.0, 50.0)
    ROWS.append(
        (
            f"cal_dpo one pair, P={p:g}",
            f"d={d:.4f}",
            f"g_a={float(g[0]):.4f}, g_b={float(g[1]):.4f} (target ±{d / 2:.4f}); π {tab.fmt(pi)}",
        )
    )
    assert float(pi[:2].sum()) < 1  # the other response keeps some mass: g_a, g_b are free
    assert abs(float(g[0]) - d / 2) < 1e-7 and abs(float(g[1]) + d / 2) < 1e-7


# --------------------------------------------------------------------------------------------
# 3. DPOP on the five-response problem: π_ref is its minimiser for λ = 50
# --------------------------------------------------------------------------------------------


def test_dpop_on_five_responses():
    """Every response is chosen in some pairs and Σ π_ref·e^g = 1 forces some g below 0, so any move
    from π_ref pays the penalty's slope λ·β on a response's chosen share; for λ = 50 (and 5) that
    outweighs DPO's gain and π_ref is a (kinked) minimiser: the loss is lowest there against random
    small moves. A small λ moves towards the best response."""
    spec = losses.get("dpop")
    loss50 = tab.paired_population(spec, beta=BETA)
    pi50 = tab.lbfgs(loss50)
    assert tab.kl(tab.PREF, pi50) < 1e-12
    gen = torch.Generator().manual_seed(0)
    at_ref = float(loss50(tab.LREF))
    for _ in range(200):
        step = 1e-3 * torch.randn(tab.K, generator=gen, dtype=DT)
        assert float(loss50(tab.LREF + step)) > at_ref
    pi1 = tab.lbfgs(tab.paired_population(spec, beta=BETA, dpop_lambda=1.0))
    ROWS.append(("dpop λ=50 (K=5)", f"{tab.kl(tab.PI_STAR, pi50):.3f}", "stays at π_ref (KL(π*_DPO‖π) left)"))
    ROWS.append(
        (
            "dpop λ=1 (K=5)",
            f"{tab.kl(tab.PI_STAR, pi1):.3f}",
            f"best 0.10→{pi1[tab.BEST]:.3f}, worst 0.25→{pi1[tab.WORST]:.3f}, {tab.fmt(pi1)}",
        )
    )
    assert pi1[tab.BEST] > tab.PREF[tab.BEST] + 0.05 and pi1[tab.WORST] < tab.PREF[tab.WORST] - 0.05


# --------------------------------------------------------------------------------------------
# 4. length: DPO's optimum grows longer, SamPO's does not
# --------------------------------------------------------------------------------------------

LENGTHS = [1, 2, 3, 4]
N_TYPES = len(LENGTHS) + 2  # a length token per ℓ, then g, n
G, N = len(LENGTHS), len(LENGTHS) + 1
QUALITY = 1.0  # r(y) = QUALITY·(#g − #n)/ℓ: per-token quality, independent of length
# the response classes (ℓ, #g) with their multiplicity C(ℓ, #g)
CLASSES = [(ell, ng, math.comb(ell, ng)) for ell in LENGTHS for ng in range(ell + 1)]


def token_logps(theta):
    """Per-token log-probs of the token types: the length token from a softmax over ℓ
    (theta[:4]), each content token g / n with probability σ(±theta[4])."""
    lg = torch.nn.functional.logsigmoid
    return torch.cat([torch.log_softmax(theta[: len(LENGTHS)], 0), torch.stack([lg(theta[G]), lg(-theta[G])])])


THETA_REF = torch.zeros(N_TYPES - 1, dtype=DT)  # uniform length, g and n equally likely
LQ_REF = token_logps(THETA_REF)


def counts(cls):
    ell, ng, _ = cls
    c = [0] * N_TYPES
    c[LENGTHS.index(ell)], c[G], c[N] = 1, ng, ell - ng
    return c


def subsets(c, size):
    """The token-type counts of a uniform `size`-subset of a response with type counts c, with
    their probabilities (multivariate hypergeometric); the whole response when size = Σ c."""
    total = sum(c)
    if size == total:
        return [(1.0, c)]
    out = []
    for pick in _compositions([min(k, size) for k in c], size):
        prob = math.prod(math.comb(k, j) for k, j in zip(c, pick)) / math.comb(total, size)
        if prob:
            out.append((prob, pick))
    return out


def _compositions(caps, size):
    if not caps:
        return [[]] if size == 0 else []
    return [[j] + rest for j in range(min(caps[0], size) + 1) for rest in _compositions(caps[1:], size - j)]


def _mu():
    lq = LQ_REF.tolist()
    w = [m * math.exp(sum(k * q for k, q in zip(counts((ell, ng, m)), lq))) for ell, ng, m in CLASSES]
    return [x / sum(w) for x in w]


def length_problem(token_subset):
    """Ordered pairs of response classes from μ⊗μ (μ = π_ref), y chosen w.p. σ(r(y) − r(y′)): the
    rows (type counts of what the loss sums, chosen and rejected) and their weights. With SamPO's
    subsets every combination of subsets enters with its probability: the exact expectation."""
    mu = _mu()
    rows_c, rows_r, weights = [], [], []
    for i, ci in enumerate(CLASSES):
        for j, cj in enumerate(CLASSES):
            if i == j:
                continue
            r = QUALITY * ((2 * ci[1] - ci[0]) / ci[0] - (2 * cj[1] - cj[0]) / cj[0])
            w = mu[i] * mu[j] / (1 + math.exp(-r))
            a, b = counts(ci), counts(cj)
            size = min(sum(a), sum(b)) if token_subset else None
            for pa, sa in subsets(a, size) if size else [(1.0, a)]:
                for pb, sb in subsets(b, size) if size else [(1.0, b)]:
                    rows_c.append(sa)
                    rows_r.append(sb)
                    weights.append(w * pa * pb)
    return t(rows_c), t(rows_r), t(weights)


def expected_length(theta):
    return float((token_logps(theta)[: len(LENGTHS)].exp() * t(LENGTHS)).sum())


def test_sampo_keeps_the_length_dpo_grows_it():
    """Labels see per-token quality only, yet DPO's optimum is longer than π_ref (+14%): summed
    log-ratios grow with the number of tokens. SamPO compares sums over the same number of tokens
    and its optimum keeps the expected length within 5%. Both raise P(g)."""
    results = {}
    for name, subset in [("sigmoid", False), ("sampo", True)]:
        spec = losses.get(name)
        a_c, a_r, w = length_problem(subset)
        ones = torch.ones(len(w), dtype=DT)

        def loss(theta, spec=spec, a_c=a_c, a_r=a_r, w=w, ones=ones):
            lq = token_logps(theta)
            out = spec.fn(a_c @ lq, a_r @ lq, a_c @ LQ_REF, a_r @ LQ_REF, len_c=ones, len_r=ones, beta=BETA)
            return (w * out).sum()

        theta = minimise(loss, THETA_REF)
        results[name] = (expected_length(theta), float(token_logps(theta)[G].exp()))
    ref_len = expected_length(THETA_REF)
    for name, (ell, pg) in results.items():
        ROWS.append(
            (
                f"length: {name}",
                f"E[ℓ]={ell:.3f}",
                f"π_ref's {ref_len:.3f} ({ell / ref_len - 1:+.1%}); P(g) 0.50→{pg:.3f}",
            )
        )
    assert results["sigmoid"][0] > 1.10 * ref_len
    assert abs(results["sampo"][0] - ref_len) < 0.05 * ref_len
    assert results["sigmoid"][1] > 0.7 and results["sampo"][1] > 0.7


def test_sampo_positions_draw_the_hypergeometric_subsets():
    """The exact expectation above weights each subset by the multivariate hypergeometric law;
    sampo_positions draws it: the length-4 response [ℓ-token, g, g, g, n] against a length-2 one
    (T_m = 3), the kept token types over 4000 seeds match those probabilities within 0.03."""
    layout = [LENGTHS.index(4), G, G, G, N]  # token types by position
    c = counts((4, 3, 0))
    exact = {tuple(pick): prob for prob, pick in subsets(c, 3)}
    seen: dict[tuple, int] = {}
    for seed in range(4000):
        kept, _ = losses.sampo_positions(5, 3, seed)
        pick = [0] * N_TYPES
        for pos in kept:
            pick[layout[pos]] += 1
        seen[tuple(pick)] = seen.get(tuple(pick), 0) + 1
    assert set(seen) <= set(exact)
    for pick, prob in exact.items():
        assert abs(seen.get(pick, 0) / 4000 - prob) < 0.03, (pick, prob)


# --------------------------------------------------------------------------------------------
# 5. β-DPO: with full-batch updates the running threshold meets the batch, β_b → β0
# --------------------------------------------------------------------------------------------


def test_beta_dpo_running_threshold_reaches_dpo():
    """ρ = 1, one deterministic batch (each pair round(4000·weight) times), plain gradient descent,
    a BetaDPOState (momentum 0.9). A fixed point of (θ, M0) has M0 = M (the moving average's only
    fixed point), so β_b = β0·(1 + α(M − M0)) = β0 and θ is DPO's optimum for this batch."""
    w = tab.pair_weights(tab.bt())
    n = torch.round(w * tab.REPLICATE).long()
    a, b = tab.YW.repeat_interleave(n), tab.YL.repeat_interleave(n)
    spec, alpha = losses.get("beta_dpo"), 0.6
    state = losses.BetaDPOState()
    theta = tab.LREF.clone().requires_grad_(True)
    beta_seen = []
    for _ in range(2000):
        lp = torch.log_softmax(theta, 0)
        h = ((lp[a] - tab.LREF[a]) - (lp[b] - tab.LREF[b])).detach()
        loss = spec.fn(
            lp[a], lp[b], tab.LREF[a], tab.LREF[b], beta=BETA, beta_dpo_alpha=alpha, beta_dpo_rho=1.0, state=state
        ).mean()
        beta_seen.append(BETA * (1 + alpha * (float(h.mean()) - state.mean)))
        (grad,) = torch.autograd.grad(loss, theta)
        with torch.no_grad():
            theta -= 5.0 * grad
    pi = torch.softmax(theta.detach(), 0)
    lp = pi.log()
    m = float(((lp[a] - tab.LREF[a]) - (lp[b] - tab.LREF[b])).mean())
    pi_dpo = tab.lbfgs(tab.paired_population(losses.get("sigmoid"), replicate=True, beta=BETA))
    ROWS.append(
        (
            "beta_dpo ρ=1, α=0.6, GD",
            f"{tab.kl(pi_dpo, pi):.1e}",
            f"KL(π*_DPO,batch‖π); M0={state.mean:.6f}, M={m:.6f}, β_b {max(beta_seen):.3f} (max) → {beta_seen[-1]:.6f}",
        )
    )
    assert abs(state.mean - m) < 1e-9
    assert abs(beta_seen[-1] - BETA) < 1e-9 and max(beta_seen) > BETA + 0.05  # β moved, then settled
    assert tab.kl(pi_dpo, pi) < 1e-9
    assert tab.kl(tab.PI_STAR, pi) < 1e-5  # the batch's rounding of the pair weights


# --------------------------------------------------------------------------------------------
# 6. TR-DPO: the reference moves towards the policy
# --------------------------------------------------------------------------------------------


def tr_dpo_run(steps, alpha=None, tau=None, lr=1.0, record=None):
    """Plain gradient descent (lr 1) on TR-DPO's loss over the weighted pairs of test_tabular.py;
    every τ steps the reference's logits move with mix_reference (alpha None: a fixed reference,
    i.e. DPO). Returns (π, the reference's π)."""
    w = tab.pair_weights(tab.bt())
    spec = losses.get("tr_dpo")
    theta = tab.LREF.clone().requires_grad_(True)
    ref = tab.LREF.clone()
    for step in range(1, steps + 1):
        lp, lr_ = torch.log_softmax(theta, 0), torch.log_softmax(ref, 0)
        loss = (w * spec.fn(lp[tab.YW], lp[tab.YL], lr_[tab.YW], lr_[tab.YL], beta=BETA)).sum()
        (grad,) = torch.autograd.grad(loss, theta)
        with torch.no_grad():
            theta -= lr * grad
        if record is not None:
            record.append((theta.detach().clone(), ref.clone()))
        if alpha is not None and step % tau == 0:
            new = losses.mix_reference(ref, theta.detach(), alpha)
            assert torch.allclose(new, alpha * theta.detach() + (1 - alpha) * ref, rtol=1e-15, atol=1e-15)
            ref = new
    return torch.softmax(theta.detach(), 0), torch.softmax(ref, 0)


def _net_wins():
    """Each response's share of wins minus its share of losses in the data."""
    w = tab.pair_weights(tab.bt())
    z = torch.zeros(tab.K, dtype=DT)
    return z.index_add(0, tab.YW, w) - z.index_add(0, tab.YL, w)


def test_tr_dpo_reference_chases_the_policy():
    """With α = 1, τ = 1 the reference is the policy before every step, so the loss is always taken
    at g = 0 and its gradient is the same at every step: −(β/2)·(net wins); θ moves along it without
    bound, towards the response with the most net wins. With α = 0.6, τ = 10 the policy also drifts
    far past DPO's optimum (mass onto the best response). DPO with its fixed reference settles at π*."""
    pi_dpo, _ = tr_dpo_run(2000)
    base = tab.kl(tab.PREF, pi_dpo)
    assert tab.kl(tab.PI_STAR, pi_dpo) < 1e-9
    record = []
    pi_half, _ = tr_dpo_run(1000, alpha=1.0, tau=1)
    pi_hard, ref_hard = tr_dpo_run(2000, alpha=1.0, tau=1, record=record)
    step = (BETA / 2) * _net_wins()  # θ_{t+1} − θ_t = −lr·∇ = lr·(β/2)·(net wins), lr = 1
    for k in (1, 500, 1999):
        assert torch.allclose(record[k][0] - record[k - 1][0], step, rtol=0, atol=1e-12)
    most = int(_net_wins().argmax())
    pi_soft, _ = tr_dpo_run(2000, alpha=0.6, tau=10)
    kl_half, kl_hard, kl_soft = (tab.kl(tab.PREF, p) for p in (pi_half, pi_hard, pi_soft))
    ROWS.append(
        ("tr_dpo: DPO, fixed reference", f"{base:.3f}", f"KL(π_ref‖π) after 2000 steps: π*_DPO {tab.fmt(pi_dpo)}")
    )
    ROWS.append(
        (
            "tr_dpo α=1, τ=1",
            f"{kl_half:.1f} / {kl_hard:.1f}",
            f"KL(π_ref‖π) after 1000 / 2000 steps; mass → y={most} (most net wins) {tab.fmt(pi_hard)}",
        )
    )
    ROWS.append(
        (
            "tr_dpo α=0.6, τ=10",
            f"{kl_soft:.1f}",
            f"KL(π_ref‖π) after 2000 steps; best {tab.PI_STAR[tab.BEST]:.3f} (π*)→{pi_soft[tab.BEST]:.3f}",
        )
    )
    assert kl_hard > 10 * base and kl_hard > 1.9 * kl_half  # linear drift, no fixed point
    assert float(pi_hard[most]) > 0.9 and torch.allclose(ref_hard, pi_hard, rtol=0, atol=1e-12)
    assert kl_soft > 10 * base and pi_soft[tab.BEST] > tab.PI_STAR[tab.BEST] + 0.3
