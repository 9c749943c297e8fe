"""The exact tabular problem: what each loss converges to, with no sampling and no model.

One prompt, K = 5 single-token responses, a softmax policy π = softmax(θ), a fixed non-uniform
reference π_ref and a known reward r. Pairs (y, y′), y ≠ y′, are drawn from μ⊗μ (μ = π_ref unless
said otherwise) and y is preferred with probability P(y≻y′) = σ(r(y) − r(y′)) (Bradley–Terry).
The population loss is the exact expectation

    L(θ) = Σ_{y≠y′} μ(y)μ(y′)·P(y≻y′)·ℓ(y_w = y, y_l = y′)

(summing over ordered pairs already counts both labels of each unordered pair). It is minimised
over θ with L-BFGS (strong Wolfe, float64), or with plain gradient descent where the claim is
about gradient steps. Losses whose value couples the pairs of a batch (AOT's sorting, BCO's
reward shift δ) are evaluated on a deterministic batch in which each pair appears round(4000·w)
times instead of weighting.

Closed forms checked (derivations in docs/losses.md):
  DPO / sigmoid_norm / rDPO(clean)   π* ∝ π_ref·exp(r/β)
  (also SamPO, TR-DPO's loss, β-DPO with ρ = 1: the same π* here)
  AlphaPO (γ = 0)                    β·(1 − π^(−α))/α = r(y) + c
  reference-free DPO                 π ∝ exp(r/β)
  IPO (μ any full-support dist.)     π ∝ π_ref·exp(p(y≻μ)/β),  p(y≻μ) = Σ_y′ μ(y′)P(y≻y′), P(y≻y) = ½
  f-DPO                              β·f′(π/π_ref)(y) = r(y) + c, c fixed by normalisation
  SFT on chosen                      π = the marginal of the chosen responses
The remedies (DPOP, Cal-DPO, SamPO, β-DPO's running β, TR-DPO's moving reference) have their own
problems in test_tabular_remedies.py. Run with `pytest -s` to print the summary table.
"""

from __future__ import annotations

import math

import pytest
import torch

from prefopt import losses

DT = torch.float64
K = 5
PI_REF = [0.10, 0.30, 0.20, 0.25, 0.15]  # the best response is the one the reference likes least
R = [1.0, -0.5, 0.4, -1.0, 0.2]
BEST, WORST = 0, 3
BETA = 0.5
NOISE = 0.2  # label flip rate for the rDPO test
REPLICATE = 4000

ROWS: list[tuple[str, str, str]] = []  # (loss, KL(π*_DPO‖π) or measure, outcome)


@pytest.fixture(scope="module", autouse=True)
def _setup_and_table():
    # tiny tensors: one thread avoids OpenMP contention on a shared machine (10× faster here)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    print_table(
        "tabular results (K=5, β=0.5, μ=π_ref, π*_DPO = π_ref·exp(r/β)/Z)", ROWS, ("loss", "KL(π*_DPO‖π)", "outcome")
    )


def print_table(title: str, rows: list, header=None) -> None:
    """The (name, measure, outcome) rows collected by a module's tests, printed under `title`
    (seen with `pytest -s`)."""
    if not rows:
        return
    lines = ([header] if header else []) + rows
    w0 = max(len(r[0]) for r in lines)
    w1 = max(len(r[1]) for r in lines)
    print(f"\n\n{title}")
    for name, measure, outcome in lines:
        print(f"{name:<{w0}}  {measure:<{w1}}  {outcome}")


# --------------------------------------------------------------------------------------------
# the problem
# --------------------------------------------------------------------------------------------


def t(x):
    return torch.tensor(x, dtype=DT)


PREF = t(PI_REF)
LREF = PREF.log()
REW = t(R)
YW, YL = [i for i in range(K) for j in range(K) if i != j], [j for i in range(K) for j in range(K) if i != j]
YW, YL = torch.tensor(YW), torch.tensor(YL)
ONES = torch.ones(len(YW), dtype=DT)


def bt(r=REW):
    """P[y, y′] = σ(r(y) − r(y′))."""
    return torch.sigmoid(r[:, None] - r[None, :])


def unanimous(r=REW):
    """P[y, y′] = 1 if r(y) > r(y′) else 0 (½ on the diagonal, unused)."""
    p = (r[:, None] > r[None, :]).to(DT)
    return p + 0.5 * torch.eye(K, dtype=DT)


def noisy(p, eps):
    return (1 - eps) * p + eps * (1 - p)


def pair_weights(p, mu=PREF):
    """w[(y, y′)] ∝ μ(y)μ(y′)P(y≻y′) over ordered pairs y ≠ y′, summing to 1."""
    w = mu[YW] * mu[YL] * p[YW, YL]
    return w / w.sum()


def win_rate(p, mu=PREF):
    """p(y≻μ) = Σ_y′ μ(y′)P(y≻y′) with P(y≻y) = ½."""
    q = p.clone()
    q.fill_diagonal_(0.5)
    return (q * mu[None, :]).sum(1)


def kl(p, q):
    """KL(p‖q), clipped at 0 (round-off can make an exact match print as −1e-16)."""
    return max(0.0, float((p * (p / q).log()).sum()))


def pi_dpo(beta=BETA):
    return torch.softmax(LREF + REW / beta, 0)


PI_STAR = pi_dpo()


def paired_population(spec, p=None, mu=PREF, replicate=False, **kw):
    """θ ↦ exact population loss of a paired loss."""
    w = pair_weights(bt() if p is None else p, mu)
    if replicate:
        n = torch.round(w * REPLICATE).long()
        a, b = YW.repeat_interleave(n), YL.repeat_interleave(n)
        ones = torch.ones(len(a), dtype=DT)

        def loss(theta):
            lp = torch.log_softmax(theta, 0)
            return spec.fn(lp[a], lp[b], LREF[a], LREF[b], len_c=ones, len_r=ones, **kw).mean()
    else:

        def loss(theta):
            lp = torch.log_softmax(theta, 0)
            return (w * spec.fn(lp[YW], lp[YL], LREF[YW], LREF[YL], len_c=ONES, len_r=ONES, **kw)).sum()

    return loss


def minimise(loss, init, iters=500):
    """L-BFGS (strong Wolfe) on a parameter vector; returns the minimiser."""
    theta = init.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta],
        lr=1,
        max_iter=iters,
        history_size=50,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        v = loss(theta)
        v.backward()
        return v

    opt.step(closure)
    return theta.detach()


def lbfgs(loss, init=None, iters=500):
    """The policy softmax(θ) at the minimiser of `loss`, from θ = log π_ref unless `init`."""
    return torch.softmax(minimise(loss, LREF if init is None else init, iters), 0)


def gd_gaps(loss, lr, checkpoints):
    """Plain gradient descent from θ = log π_ref; the log-ratio gap g(best) − g(worst) at each
    checkpoint, g = log π − log π_ref."""
    theta = LREF.clone().requires_grad_(True)
    opt = torch.optim.SGD([theta], lr=lr)
    gaps = []
    for step in range(1, max(checkpoints) + 1):
        opt.zero_grad()
        loss(theta).backward()
        opt.step()
        if step in checkpoints:
            g = torch.log_softmax(theta.detach(), 0) - LREF
            gaps.append(float(g[BEST] - g[WORST]))
    return gaps


def tab_kwargs(spec):
    """Hyperparameters for the tabular runs: β = 0.5 wherever there is a β; SimPO's γ keeps its
    default γ/β = 0.5; IPO on summed log-ratios (single tokens: lengths are 1 anyway)."""
    kw = {}
    if "beta" in spec.hyperparameters:
        kw["beta"] = BETA
    if spec.name == "simpo":
        kw["gamma"] = 0.5 * BETA
    if spec.name == "ipo":
        kw["ipo_normalize"] = False
    if spec.name == "beta_dpo":
        kw["beta_dpo_rho"] = 1.0  # ρ < 1 draws pairs at random
    return kw


def fmt(pi):
    return "[" + ", ".join(f"{x:.3f}" for x in pi.tolist()) + "]"


# --------------------------------------------------------------------------------------------
# closed forms
# --------------------------------------------------------------------------------------------


# sampo: on single tokens every subset is the whole response; tr_dpo: the loss against a fixed
# reference (its moving reference: test_tabular_remedies.py); beta_dpo with ρ = 1 and the batch's
# own mean as M0: β_b = β0
@pytest.mark.parametrize("name", ["sigmoid", "sigmoid_norm", "robust", "rpo", "sampo", "tr_dpo", "beta_dpo"])
def test_dpo_reaches_closed_form(name):
    spec = losses.get(name)
    kw = tab_kwargs(spec)
    if name == "rpo":
        kw["rpo_alpha"] = 0.0  # RPO with α = 0 is DPO; α > 0 is tested for direction below
    pi = lbfgs(paired_population(spec, **kw))
    d = kl(PI_STAR, pi)
    if name in ("sampo", "tr_dpo", "beta_dpo"):
        ROWS.append((name, f"{d:.1e}", "reaches π*_DPO (single tokens; fixed reference; ρ = 1, no state)"))
    elif name != "rpo":
        ROWS.append((name, f"{d:.1e}", f"reaches π*_DPO {fmt(pi)}"))
    assert d < 1e-3, (name, d)
    assert d < 1e-9  # in fact to round-off


def test_dpo_closed_form_any_mu():
    mu = torch.full((K,), 1.0 / K, dtype=DT)
    pi = lbfgs(paired_population(losses.get("sigmoid"), mu=mu, beta=BETA))
    assert kl(PI_STAR, pi) < 1e-9  # DPO's optimum does not depend on the sampling distribution


@pytest.mark.parametrize("mu_name", ["pi_ref", "uniform"])
def test_ipo_reaches_closed_form(mu_name):
    mu = PREF if mu_name == "pi_ref" else torch.full((K,), 1.0 / K, dtype=DT)
    p = bt()
    pi = lbfgs(paired_population(losses.get("ipo"), p=p, mu=mu, beta=BETA, ipo_normalize=False))
    target = torch.softmax(LREF + win_rate(p, mu) / BETA, 0)
    d = kl(target, pi)
    if mu_name == "pi_ref":
        ROWS.append(("ipo", f"{kl(PI_STAR, pi):.3f}", f"reaches π_ref·exp(p(y≻μ)/β)/Z, KL {d:.1e}; {fmt(pi)}"))
    assert d < 1e-3, d
    assert d < 1e-9


def test_reference_free_dpo_closed_form():
    pi = lbfgs(paired_population(losses.get("sigmoid_ref_free"), beta=BETA))
    target = torch.softmax(REW / BETA, 0)
    d = kl(target, pi)
    ROWS.append(
        (
            "sigmoid_ref_free",
            f"{kl(PI_STAR, pi):.3f}",
            f"reaches softmax(r/β), KL {d:.1e}; best {PI_REF[BEST]:.2f}→{pi[BEST]:.3f}",
        )
    )
    assert d < 1e-9


def _f_inverse(divergence, alpha):
    """x = (f′)⁻¹(v) and the sup of f′ (v must stay below it)."""
    if divergence == "forward_kl":
        return (lambda v: -1.0 / v), 0.0
    if divergence == "js":
        return (lambda v: math.exp(v) / (2 - math.exp(v))), math.log(2.0)
    return (lambda v: (1 - alpha * v) ** (-1.0 / alpha)), 1.0 / alpha


def f_dpo_optimum(divergence, alpha=1.0, beta=BETA):
    """π(y) = π_ref(y)·x(y) with β·f′(x(y)) = r(y) + c and Σ π_ref·x = 1 (bisection on c)."""
    inv, sup = _f_inverse(divergence, alpha)

    def mass(c):
        return sum(PI_REF[i] * inv((R[i] + c) / beta) for i in range(K))

    hi = beta * sup - max(R)
    lo = hi - 1.0
    while mass(lo) > 1:
        lo -= 2 * (hi - lo)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mass(mid) < 1 else (lo, mid)
    c = 0.5 * (lo + hi)
    return t([PI_REF[i] * inv((R[i] + c) / beta) for i in range(K)])


@pytest.mark.parametrize("divergence,alpha", [("forward_kl", 1.0), ("js", 1.0), ("alpha", 0.5)])
def test_f_dpo_reaches_closed_form(divergence, alpha):
    target = f_dpo_optimum(divergence, alpha)
    assert abs(float(target.sum()) - 1) < 1e-12
    pi = lbfgs(paired_population(losses.get("sigmoid"), beta=BETA, f_divergence=divergence, f_alpha=alpha))
    d = kl(target, pi)
    label = f"sigmoid[f={divergence}" + (f",α={alpha}]" if divergence == "alpha" else "]")
    ROWS.append((label, f"{kl(PI_STAR, pi):.3f}", f"reaches β·f′(π/π_ref) = r + c, KL {d:.1e}"))
    assert d < 1e-9, d


def alphapo_optimum(alpha, beta=BETA):
    """π with β·r_α(π(y)) = r(y) + c, r_α(p) = (1 − p^(−α))/α (single tokens: |y| = 1), c fixed by
    Σ π = 1 (bisection): π(y) = (1 − α·(r(y) + c)/β)^(−1/α); α = 0: π ∝ exp(r/β)."""
    if alpha == 0:
        return torch.softmax(REW / beta, 0)

    def pi(c):
        return [(1 - alpha * (R[i] + c) / beta) ** (-1.0 / alpha) for i in range(K)]

    lo, hi = -max(R) - 1.0, -max(R)  # c ≤ −max r keeps every π ≤ 1; at c = −max r, Σ π > 1
    while sum(pi(lo)) > 1:
        lo -= 2 * (hi - lo)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if sum(pi(mid)) < 1 else (lo, mid)
    return t(pi(0.5 * (lo + hi)))


@pytest.mark.parametrize("alpha", [0.25, 1.0, 0.0])
def test_alphapo_reaches_closed_form(alpha):
    """Reference-free, single tokens, γ = 0: the pair loss is smallest where
    β·(r_α(π(y)) − r_α(π(y′))) = logit P(y≻y′) = r(y) − r(y′) for every pair, reachable for α ≥ 0
    (r_α spans (−∞, 0]); so β·r_α(π(y)) = r(y) + c. α = 0 is SimPO's (and reference-free DPO's)
    softmax(r/β)."""
    target = alphapo_optimum(alpha)
    assert abs(float(target.sum()) - 1) < 1e-12
    pi = lbfgs(paired_population(losses.get("alphapo"), beta=BETA, gamma=0.0, alphapo_alpha=alpha))
    d = kl(target, pi)
    ROWS.append(
        (f"alphapo α={alpha:g}, γ=0", f"{kl(PI_STAR, pi):.3f}", f"reaches β·r_α(π) = r + c, KL {d:.1e}; {fmt(pi)}")
    )
    assert d < 1e-9, d


# --------------------------------------------------------------------------------------------
# label noise: rDPO is unbiased, DPO and cDPO are not
# --------------------------------------------------------------------------------------------


def test_label_noise_rdpo_vs_dpo_vs_cdpo():
    p = noisy(bt(), NOISE)
    pi_r = lbfgs(paired_population(losses.get("robust"), p=p, beta=BETA, label_smoothing=NOISE))
    pi_d = lbfgs(paired_population(losses.get("sigmoid"), p=p, beta=BETA))
    pi_c = lbfgs(paired_population(losses.get("sigmoid"), p=p, beta=BETA, label_smoothing=NOISE))
    d_r, d_d, d_c = kl(PI_STAR, pi_r), kl(PI_STAR, pi_d), kl(PI_STAR, pi_c)
    ROWS.append((f"robust ε={NOISE} noisy labels", f"{d_r:.1e}", "reaches the clean π*"))
    ROWS.append(("sigmoid (DPO) noisy labels", f"{d_d:.3f}", f"misses π*: {fmt(pi_d)} vs {fmt(PI_STAR)}"))
    ROWS.append((f"sigmoid ε={NOISE} (cDPO) noisy", f"{d_c:.3f}", "misses π* (smooths twice)"))
    assert d_r < 1e-3 and d_r < 1e-9
    assert d_d > 0.05 and d_c > 0.05
    assert d_c > d_d  # cDPO's smoothing shrinks the margins further
    # the noise flattens DPO's solution: less mass on the best response than π*
    assert pi_d[BEST] < PI_STAR[BEST] and pi_c[BEST] < pi_d[BEST]


# --------------------------------------------------------------------------------------------
# unanimous preferences: DPO's gap diverges, IPO's settles
# --------------------------------------------------------------------------------------------


def test_unanimous_dpo_diverges_ipo_settles():
    p = unanimous()
    steps = (1000, 2000, 4000)
    dpo = gd_gaps(paired_population(losses.get("sigmoid"), p=p, beta=BETA), lr=1.0, checkpoints=steps)
    ipo = gd_gaps(paired_population(losses.get("ipo"), p=p, beta=BETA, ipo_normalize=False), lr=1.0, checkpoints=steps)
    target = float((win_rate(p)[BEST] - win_rate(p)[WORST]) / BETA)
    ROWS.append(
        (
            "sigmoid unanimous, gap g(best)−g(worst)",
            "-",
            "GD 1k/2k/4k steps: " + " / ".join(f"{g:.2f}" for g in dpo) + " (keeps growing)",
        )
    )
    ROWS.append(
        (
            "ipo unanimous, gap g(best)−g(worst)",
            "-",
            "GD 1k/2k/4k steps: " + " / ".join(f"{g:.4f}" for g in ipo) + f" (target {target:.4f})",
        )
    )
    # DPO: the gap keeps growing by a clear amount at every doubling of the number of steps
    assert dpo[1] - dpo[0] > 1.0 and dpo[2] - dpo[1] > 1.0
    assert dpo[2] > 10 * target
    # IPO: settled at (p(best≻μ) − p(worst≻μ))/β
    assert abs(ipo[2] - target) < 1e-6 and abs(ipo[2] - ipo[1]) < 1e-6


# --------------------------------------------------------------------------------------------
# every other paired loss: direction (no closed form known)
# --------------------------------------------------------------------------------------------

BATCH_COUPLED = {"aot", "aot_pair", "bco_pair", "mpo"}
CLOSED_FORM = {"sigmoid", "sigmoid_norm", "robust", "ipo", "sigmoid_ref_free", "sampo", "tr_dpo", "beta_dpo", "alphapo"}
# from π_ref, gradient-based minimisation of these does not move mass to the best response:
COLLAPSE_ON_MOST_CHOSEN = {"aot_pair", "apo_down"}
# DPOP with its default λ = 50 stays at π_ref here (every response is chosen in some pairs):
# test_tabular_remedies.py
STAYS_AT_REFERENCE = {"dpop"}
DIRECTION = sorted(
    set(losses.names(paired=True)) - CLOSED_FORM - COLLAPSE_ON_MOST_CHOSEN - STAYS_AT_REFERENCE - {"discopop"}
)


def _population(name):
    spec = losses.get(name)
    return paired_population(spec, replicate=name in BATCH_COUPLED, **tab_kwargs(spec))


@pytest.mark.parametrize("name", DIRECTION)
def test_direction(name):
    pi = lbfgs(_population(name))
    ROWS.append(
        (
            name,
            f"{kl(PI_STAR, pi):.3f}",
            f"best {PI_REF[BEST]:.2f}→{pi[BEST]:.3f}, worst {PI_REF[WORST]:.2f}→{pi[WORST]:.3f}",
        )
    )
    if name == "sft":
        # NLL on the chosen response is maximum likelihood on the winners: π = their marginal
        assert kl(_chosen_marginal(), pi) < 1e-9
    assert pi[BEST] > PREF[BEST] + 0.01, (name, fmt(pi))
    assert pi[WORST] < PREF[WORST] - 0.01, (name, fmt(pi))
    assert float(pi @ REW) > float(PREF @ REW)


def _chosen_marginal():
    w = pair_weights(bt())
    return torch.zeros(K, dtype=DT).index_add_(0, YW, w)


@pytest.mark.parametrize("name", sorted(COLLAPSE_ON_MOST_CHOSEN))
def test_collapse_on_most_chosen(name):
    """aot_pair and apo_down only see how often a response is chosen vs rejected, and saturate:
    from π_ref they put all mass on the most frequently chosen response (y=2, chosen in 27% of
    the pairs), not on the best one (y=0, which π_ref rarely samples). Their infimum is lower
    (mass on the best, log-ratios spread in reward order) but lies behind a saturated plateau."""
    loss = _population(name)
    pi = lbfgs(loss)
    most_chosen = int(_chosen_marginal().argmax())
    spread = torch.zeros(K, dtype=DT)
    for rank, i in enumerate(sorted(range(K), key=lambda i: -R[i])):
        spread[i] = -100.0 * rank
    ROWS.append(
        (
            name,
            f"{kl(PI_STAR, pi):.1f}",
            f"collapses on most-chosen y={most_chosen} (π={pi[most_chosen]:.3f}), best→{pi[BEST]:.1e}; "
            f"loss {float(loss(torch.log(pi))):.3f} vs {float(loss(spread)):.3f} at reward-ordered spread",
        )
    )
    assert most_chosen != BEST
    assert pi[most_chosen] > 0.99 and pi[WORST] < 1e-6
    assert float(loss(spread)) < float(loss(torch.log(pi))) - 0.01


def test_discopop_wrong_way_from_reference():
    """DiscoPOP's per-pair loss ℓ(x), x = β·h, τ = 0.05, rises at x = 0 (ℓ′(0) = (1−log 2)/(4τ) − ¾
    ≈ +0.78) and has a local minimum at x ≈ −0.12. Started at π = π_ref the population loss is
    minimised towards the *rejected* side; started at π*_DPO it stays on the right side."""
    spec = losses.get("discopop")
    x = torch.zeros(1, dtype=DT, requires_grad=True)
    z = torch.zeros(1, dtype=DT)
    (g,) = torch.autograd.grad(spec.fn(x, z, z, z, beta=1.0).sum(), x)
    assert abs(float(g) - ((1 - math.log(2)) / (4 * 0.05) - 0.75)) < 1e-12
    loss = _population("discopop")
    pi_ref_start = lbfgs(loss)
    pi_dpo_start = lbfgs(loss, init=PI_STAR.log())
    ROWS.append(
        (
            "discopop (from π_ref)",
            f"{kl(PI_STAR, pi_ref_start):.3f}",
            f"WRONG WAY: best {PI_REF[BEST]:.2f}→{pi_ref_start[BEST]:.3f}, "
            f"worst {PI_REF[WORST]:.2f}→{pi_ref_start[WORST]:.3f} (local min)",
        )
    )
    ROWS.append(
        (
            "discopop (from π*_DPO)",
            f"{kl(PI_STAR, pi_dpo_start):.3f}",
            f"best→{pi_dpo_start[BEST]:.3f}, worst→{pi_dpo_start[WORST]:.3f}, "
            f"loss {float(loss(pi_dpo_start.log())):.3f} < {float(loss(pi_ref_start.log())):.3f}",
        )
    )
    assert pi_ref_start[BEST] < PREF[BEST] and pi_ref_start[WORST] > PREF[WORST]
    assert pi_dpo_start[BEST] > PREF[BEST] and pi_dpo_start[WORST] < PREF[WORST]
    assert float(loss(pi_dpo_start.log())) < float(loss(pi_ref_start.log())) - 0.1


# --------------------------------------------------------------------------------------------
# unpaired: desirable = the top-2 responses by reward
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", losses.names(paired=False))
def test_unpaired_direction(name):
    spec = losses.get(name)
    n = torch.round(PREF * 1000).long()
    ys = torch.arange(K).repeat_interleave(n)  # y ~ μ = π_ref, deterministically
    top = sorted(range(K), key=lambda i: -R[i])[:2]
    label = torch.isin(ys, torch.tensor(top))
    kw = {"beta": BETA}

    def loss(theta):
        lp = torch.log_softmax(theta, 0)
        # KTO's z0 from "mismatched" completions: in a one-prompt world, other samples of μ
        return spec.fn(lp[ys], LREF[ys], label, kl_logp=lp[ys], kl_ref_logp=LREF[ys], **kw).mean()

    pi = lbfgs(loss)
    ROWS.append(
        (
            name,
            f"{kl(PI_STAR, pi):.3f}",
            f"desirable mass {float(PREF[top].sum()):.2f}→{float(pi[top].sum()):.3f}, "
            f"best {PI_REF[BEST]:.2f}→{pi[BEST]:.3f}, worst {PI_REF[WORST]:.2f}→{pi[WORST]:.3f}",
        )
    )
    assert float(pi[top].sum()) > 0.99  # the undesirable responses are driven out
    assert pi[WORST] < PREF[WORST] - 0.01
    if name == "bco":
        # BCO classifies against the mean reward δ, which follows the undesirable log-ratios down
        # to −∞: a desirable response only has to beat δ, so all mass ends on the desirable
        # response μ samples most (y=2), and the best one (y=0, rarer under μ) loses mass.
        assert pi[2] > 0.99 and pi[BEST] < PREF[BEST]
    else:
        assert pi[BEST] > PREF[BEST] + 0.01
