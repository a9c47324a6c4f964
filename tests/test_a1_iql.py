"""Assignment A1 (IQL, assignments/A1-iql.md): the autograder. `python -m pytest -m a1`.

Every value is checked against a reference written out here by hand (small numbers) or computed
independently of iql.py (explicit formulas, loops), on inputs that vary (several taus, betas,
clips, gammas and done flags, states whose successor differs), so a hard-coded or plausible-but-wrong
answer fails. assignments/mistakes.py lists the mistakes these tests are known to catch."""
import copy
import math
import re

import numpy as np
import pytest
import torch

import iql

pytestmark = pytest.mark.a1


# ----------------------------------------------------------------------------------------
# expectile_loss, q_target, awr_weights: the three small formulas
# ----------------------------------------------------------------------------------------

def test_expectile_loss_by_hand():
    diff = torch.tensor([2.0, -1.0, 0.5, -3.0])
    # tau = 0.9: positive diffs (target above the prediction) weigh 0.9, negative ones 0.1
    assert iql.expectile_loss(diff, 0.9).item() == pytest.approx((0.9 * 4 + 0.1 * 1 + 0.9 * 0.25 + 0.1 * 9) / 4)
    assert iql.expectile_loss(diff, 0.2).item() == pytest.approx((0.2 * 4 + 0.8 * 1 + 0.2 * 0.25 + 0.8 * 9) / 4)
    assert iql.expectile_loss(diff, 0.5).item() == pytest.approx(0.5 * (4 + 1 + 0.25 + 9) / 4)   # half the MSE
    assert iql.expectile_loss(torch.zeros(3), 0.7).item() == 0.0


@pytest.mark.parametrize("tau,seed", [(0.7, 0), (0.9, 1), (0.3, 2)])
def test_expectile_loss_against_a_loop(tau, seed):
    diff = torch.randn(37, generator=torch.Generator().manual_seed(seed)) * 2
    want = sum((tau if x >= 0 else 1 - tau) * x * x for x in diff.tolist()) / len(diff)
    got = iql.expectile_loss(diff, tau)
    assert got.shape == () and got.item() == pytest.approx(want, rel=1e-5)


def test_expectile_above_one_half_pulls_the_minimiser_up():
    """The tau-expectile of a sample is the v minimising the loss of (x - v): above the mean for
    tau > 0.5 (V tracks the better in-data actions), below it for tau < 0.5."""
    x = torch.tensor([0.0, 0.0, 0.0, 1.0])
    grid = torch.linspace(-0.5, 1.5, 2001)
    for tau, lo, hi in ((0.9, 0.70, 0.80), (0.5, 0.24, 0.26), (0.1, 0.02, 0.05)):
        best = grid[torch.stack([iql.expectile_loss(x - v, tau) for v in grid]).argmin()].item()
        # closed form: v = tau / (tau + 3 (1 - tau)) for three 0s and one 1
        assert best == pytest.approx(tau / (tau + 3 * (1 - tau)), abs=1e-3) and lo < best < hi, (tau, best)


def test_q_target_by_hand():
    r = torch.tensor([1.0, 0.5, -1.0, 2.0])
    v_next = torch.tensor([10.0, 10.0, 4.0, -2.0])
    done = torch.tensor([0.0, 1.0, 0.0, 1.0])
    # gamma 0.9: 1 + 9 | 0.5 (terminal: no V) | -1 + 3.6 | 2 (terminal)
    torch.testing.assert_close(iql.q_target(r, v_next, done, 0.9), torch.tensor([10.0, 0.5, 2.6, 2.0]))
    # gamma 0.5
    torch.testing.assert_close(iql.q_target(r, v_next, done, 0.5), torch.tensor([6.0, 0.5, 1.0, 2.0]))


def test_q_target_against_numpy():
    g = np.random.default_rng(3)
    r, v, d = g.normal(size=50), g.normal(size=50) * 3, (g.random(50) < 0.3).astype(float)
    want = r + 0.97 * (1 - d) * v
    got = iql.q_target(*(torch.tensor(x, dtype=torch.float32) for x in (r, v, d)), 0.97)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_awr_weights_by_hand():
    adv = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.4])
    w, clipped = iql.awr_weights(adv, beta=3.0, clip=100.0)
    want = torch.tensor([1.0, math.exp(3.0), math.exp(-3.0), 100.0, math.exp(1.2)])     # exp(6) = 403 > 100
    torch.testing.assert_close(w, want, rtol=1e-5, atol=0)
    assert clipped.dtype == torch.bool and clipped.tolist() == [False, False, False, True, False]
    w, clipped = iql.awr_weights(adv, beta=0.5, clip=1.5)
    want = torch.tensor([1.0, 1.5, math.exp(-0.5), 1.5, math.exp(0.2)])                 # exp(0.5) = 1.65 > 1.5
    torch.testing.assert_close(w, want, rtol=1e-5, atol=0)
    assert clipped.tolist() == [False, True, False, True, False]


# ----------------------------------------------------------------------------------------
# turn_rewards and transitions: the offline dataset
# ----------------------------------------------------------------------------------------

def _focal(emotion, score, offer=30.0):
    """A focal turn with an LLM-judge score (no rubric components): its judge part is
    (score - 5.5) / 4.5, so score 7.75 -> 0.5, 3.25 -> -0.5, 10 -> 1, 1 -> -1."""
    return {"speaker": "focal", "text": "x", "emotion": emotion, "offer": offer, "score": score}


def _cp(offer):
    return {"speaker": "counterparty", "text": "y", "offer": offer}


def _rec(turns, success, utility, domain="crad"):
    return {"key": "k", "domain": domain, "s0": 20.0, "b0": 220.0, "turns": turns,
            "outcome": {"success": success, "utility": utility, "agreement": None, "end": "x", "rounds": 1}}


def test_turn_rewards_by_hand():
    cfg = iql.IQLConfig(outcome_weight=2.0, fail_penalty=0.5)
    deal = _rec([_focal("joy", 7.75), _cp(200.0), _focal("anger", 3.25), _cp(180.0), _focal("pride", 10.0)],
                True, 0.6)
    # centred on 0.25: 0.5 - 0.25 | -0.5 - 0.25 | 1 - 0.25 + 2 * 0.6 (the outcome, on the last row only)
    assert iql.turn_rewards(deal, cfg, 0.25) == pytest.approx([0.25, -0.75, 1.95])
    walk = _rec([_focal("joy", 7.75), _cp(200.0), _focal("fear", 1.0), _cp(200.0)], False, 0.0)
    # no deal: the last row pays -fail_penalty instead of the outcome
    assert iql.turn_rewards(walk, cfg, -0.1) == pytest.approx([0.6, -1.0 + 0.1 - 0.5])
    other = iql.IQLConfig(outcome_weight=3.0, fail_penalty=0.8)
    assert iql.turn_rewards(walk, other, 0.0) == pytest.approx([0.5, -1.0 - 0.8])
    assert iql.turn_rewards(deal, other, 0.0) == pytest.approx([0.5, -0.5, 1.0 + 3.0 * 0.6])


def test_turn_rewards_missing_score_adds_zero_and_skips_emotionless_turns():
    cfg = iql.IQLConfig(outcome_weight=2.0, fail_penalty=0.5)
    rec = _rec([_focal("joy", None), _cp(200.0), _focal(None, 9.0), _cp(190.0), _focal("caring", 7.75)], True, 0.3)
    # row 0: no score -> 0 even after centring; the emotion-free focal turn is no row; row 1: 0.5 - 0.2 + 0.6
    assert iql.turn_rewards(rec, cfg, 0.2) == pytest.approx([0.0, 0.9])


def _trajectory():
    """Focal turns at 0, 2, 4, 6; the one at 2 has no emotion (not a row), so rows are turns 0, 4, 6."""
    return _rec([_focal("joy", 7.75, 30.0), _cp(200.0), _focal(None, 5.5, 40.0), _cp(190.0),
                 _focal("anger", 3.25, 50.0), _cp(170.0), _focal("caring", 10.0, 60.0), _cp(150.0)], True, 0.45)


def test_transitions_by_hand():
    doms = ["crad", "student"]
    cfg = iql.IQLConfig(judge_centre=0.0, outcome_weight=2.0, gamma=0.9)
    rec, short = _trajectory(), _rec([_focal("fear", 1.0), _cp(210.0)], False, 0.0, domain="student")
    data = iql.transitions([rec, short], doms, cfg)
    t = rec["turns"]

    def f(turns, r=rec):
        return torch.tensor(iql.features(turns, r["s0"], r["b0"], r["domain"], doms))
    assert data["where"] == [(0, 0), (0, 4), (0, 6), (1, 0)]
    assert data["a"].tolist() == [iql.EMOTIONS.index(e) for e in ("joy", "anger", "caring", "fear")]
    assert data["d"].tolist() == [0.0, 0.0, 1.0, 1.0]                 # done on each trajectory's last row only
    torch.testing.assert_close(data["r"], torch.tensor([0.5, -0.5, 1.0 + 0.9, -1.0 - 0.5]))
    for k, (s, s2) in enumerate([(t[:0], t[:4]), (t[:4], t[:6]), (t[:6], t)]):
        # s: the turns before this row's focal turn; s': the turns before the *next row's* focal turn
        torch.testing.assert_close(data["s"][k], f(s), msg=f"row {k}: s")
        torch.testing.assert_close(data["s2"][k], f(s2), msg=f"row {k}: s'")
    torch.testing.assert_close(data["s"][3], f([], short))
    torch.testing.assert_close(data["s2"][3], f(short["turns"], short))
    assert not torch.equal(data["s"][:3], data["s2"][:3])               # s' is never s here
    assert data["returns"][0] == pytest.approx(0.5 + 0.9 * -0.5 + 0.81 * 1.9, rel=1e-6)


def test_advantages_that_rank_the_sft_turns_by_hand():
    """iql.advantages (given, built on q_target): A = r + gamma (1 - d) V(s') - V(s), here with
    V(x) = x1 + 2 x2 + 0.5 and identity normalisation."""
    model = iql.IQL(2, hidden=4)
    model.v = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.v.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.v.bias.fill_(0.5)
    data = {"s": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "s2": torch.tensor([[2.0, 0.0], [1.0, 1.0]]),
            "r": torch.tensor([0.5, -1.0]), "d": torch.tensor([0.0, 1.0])}
    # V(s) = 1.5, 2.5 ; V(s') = 2.5, 3.5 ; A = 0.5 + 0.9 * 2.5 - 1.5 = 1.25 ; -1 - 2.5 (terminal) = -3.5
    torch.testing.assert_close(iql.advantages(model, data, 0.9), torch.tensor([1.25, -3.5]))


# ----------------------------------------------------------------------------------------
# One IQL step (train's loss block), against an update computed here from the formulas
# ----------------------------------------------------------------------------------------

def _step_data(n=24, nf=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    acts = torch.tensor([iql.EMOTIONS.index(e) for e in ("joy", "anger", "caring", "pride")])
    return {"s": torch.randn(n, nf, generator=g), "s2": torch.randn(n, nf, generator=g) + 1.0,
            "a": acts[torch.randint(0, 4, (n,), generator=g)], "r": torch.randn(n, generator=g),
            "d": (torch.rand(n, generator=g) < 0.4).float()}


def _reference_update(model, targets, data, cfg, step=0):
    """The expected parameters after one plain SGD step (lr 1) of IQL, and the step's losses,
    written from the formulas in assignments/A1-iql.md without iql.py's loss functions."""
    m = copy.deepcopy(model)
    n = data["s"].shape[0]
    g = torch.Generator()
    g.manual_seed(cfg.seed * 1_000_003 + step)                      # the same minibatch as train's scaffold
    i = torch.randint(0, n, (min(cfg.batch_size, n),), generator=g)
    s, s2 = m.norm(data["s"])[i], m.norm(data["s2"])[i]
    a, r, d = data["a"][i], data["r"][i], data["d"][i]
    with torch.no_grad():
        qt = torch.min(targets[0](s), targets[1](s))[torch.arange(len(a)), a]     # twin target Q, in-data action
        v_next = m.v(s2)[:, 0]
    v = m.v(s)[:, 0]
    diff = qt - v
    v_loss = (torch.where(diff >= 0, cfg.expectile, 1 - cfg.expectile) * diff ** 2).mean()
    y = r + cfg.gamma * (1 - d) * v_next
    q_loss = ((m.q1(s)[torch.arange(len(a)), a] - y) ** 2).mean() + ((m.q2(s)[torch.arange(len(a)), a] - y) ** 2).mean()
    adv = qt - v.detach()
    w = torch.exp(cfg.beta * adv).clamp(max=cfg.clip_weight)
    logits = m.pi(s).masked_fill(~m.seen, float("-inf"))
    pi_loss = -(w * torch.log_softmax(logits, 1)[torch.arange(len(a)), a]).mean()
    (v_loss + q_loss + pi_loss).backward()
    want = {k: (p - p.grad if p.grad is not None else p).detach() for k, p in m.named_parameters()}
    raw = torch.exp(cfg.beta * adv)
    clipped = (raw > cfg.clip_weight).float().mean().item()
    return want, {"v_loss": v_loss.item(), "q_loss": q_loss.item(), "pi_loss": pi_loss.item(), "clipped": clipped}, raw


@pytest.mark.parametrize("seed,expectile,beta,gamma", [(0, 0.7, 3.0, 0.99), (1, 0.9, 0.5, 0.8)])
def test_one_iql_step_matches_the_formulas(seed, expectile, beta, gamma):
    data = _step_data(seed=seed)
    nf = data["s"].shape[1]
    torch.manual_seed(100 + seed)
    model = iql.IQL(nf, hidden=8)
    model.seen[:] = False
    model.seen[data["a"].unique()] = True                             # only the 4 data actions
    model.mean.copy_(data["s"].mean(0))
    model.std.copy_(data["s"].std(0))
    targets = torch.nn.ModuleList([iql.mlp(nf, len(iql.EMOTIONS), 8) for _ in range(2)])
    with torch.no_grad():                                             # two different, O(1) target critics
        for k, t in enumerate(targets):
            t[-1].weight.mul_(6.0 + 4 * k)
            t[-1].bias.add_(3.6)
    targets.requires_grad_(False)
    cfg = iql.IQLConfig(steps=1, batch_size=16, expectile=expectile, beta=beta, gamma=gamma, clip_weight=math.inf,
                        tau=0.0, seed=seed, log_every=1)
    cfg.clip_weight = _reference_update(model, targets, data, cfg)[2].median().item()   # about half clipped
    want, losses, _ = _reference_update(model, targets, data, cfg)
    assert 0.2 < losses["clipped"] < 0.8                               # some weights clipped, some not
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    lines = []
    trained, *_ = iql.train(data, cfg, model=model, targets=targets, opt=opt, log=lines.append)
    got = dict(trained.named_parameters())
    for net in ("v", "q1", "q2", "pi"):                               # V learns from v_loss only, Q from q_loss, pi from pi_loss
        for k in (k for k in want if k.startswith(net + ".")):
            torch.testing.assert_close(got[k].detach(), want[k], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, k=k: f"{k} after one step differs from the formulas' update: {m}")
    row = dict(re.findall(r"(\w+) (-?[\d.e+-]+)", lines[-1]))
    for k, v in losses.items():
        assert float(row[k]) == pytest.approx(v, rel=2e-3, abs=1e-6), (k, row[k], v)


# ----------------------------------------------------------------------------------------
# End to end: a reward that arrives one step later must be propagated through (1 - done) V(s')
# ----------------------------------------------------------------------------------------

def _delayed_reward_task(n=600, seed=0):
    """Two focal turns. First turn (state [0, 0]): 'caring' pays 0 now and leads to the good
    state [1, 1]; 'anger' pays 0.3 now and leads to the bad state [1, 0]. Second turn (terminal):
    every action pays 1 in the good state, 0 in the bad one. Q(s0, caring) = gamma * 1 beats
    Q(s0, anger) = 0.3 only through V(s') on a non-terminal row."""
    g = np.random.default_rng(seed)
    car, ang = iql.EMOTIONS.index("caring"), iql.EMOTIONS.index("anger")
    rows = []
    for _ in range(n):
        a0 = int(g.choice([car, ang]))
        good = float(a0 == car)
        rows.append(([0.0, 0.0], a0, (0.0 if good else 0.3) + g.normal(0, 0.05), [1.0, good], 0.0))
        rows.append(([1.0, good], int(g.choice([car, ang])), good + g.normal(0, 0.05), [1.0, good], 1.0))
    s, a, r, s2, d = zip(*rows)
    return {"s": torch.tensor(s), "a": torch.tensor(a), "r": torch.tensor(r, dtype=torch.float32),
            "s2": torch.tensor(s2), "d": torch.tensor(d)}


def test_iql_learns_a_delayed_reward():
    data = _delayed_reward_task()
    cfg = iql.IQLConfig(steps=400, hidden=32, batch_size=64, lr=3e-3, log_every=10**9)
    model, *_ = iql.train(data, cfg, log=None)
    with torch.no_grad():
        p = torch.softmax(model.policy_logits(torch.tensor([[0.0, 0.0]])), -1)[0]
        v = model.v(model.norm(torch.tensor([[1.0, 1.0], [1.0, 0.0]])))[:, 0]
    # measured with the solution: pi(caring) 0.62, V = 0.82 and -0.01 (seeds 1-3 of the task: 0.61-0.68);
    # with done = 1 on every row, or s' = s, the same run picks anger (0.69)
    assert iql.EMOTIONS[int(p.argmax())] == "caring", p[p > 0]
    assert v[0] > 0.6 and abs(v[1]) < 0.2, v                            # V(good) on its way to 1, V(bad) near 0
    assert int(model.seen.sum()) == 2 and p[~model.seen].sum() == 0
