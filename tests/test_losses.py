"""Losses on the cached top-k support against dense reference computations, gradients included."""
import typing

import pytest
import torch
import torch.nn.functional as F

from distill.errors import UsageError
from distill.train.losses import DIVERGENCES, dense_kd, divergence, loss_kwargs, soft_label_kd, sparse_kd


def dense_bucket_reference(teacher_logits, student_logits, k, kind, temperature=1.0, **kw):
    """The same quantity computed densely: both full distributions coarsened to (top-k of teacher, rest),
    then each bucket distribution tempered: softmax(log(bucket probs) / T)."""
    p = F.softmax(teacher_logits.double(), -1)
    q = F.softmax(student_logits.double(), -1)
    top = p.topk(k, -1).indices
    mask = torch.zeros_like(p, dtype=torch.bool).scatter(-1, top, True)
    pb = torch.cat([p.gather(-1, top), (p * ~mask).sum(-1, keepdim=True)], -1)
    qb = torch.cat([q.gather(-1, top), (q * ~mask).sum(-1, keepdim=True)], -1)
    if k == p.shape[-1]:  # no tail bucket at all
        pb, qb = pb[:, :-1], qb[:, :-1]
    if temperature != 1.0:
        pb, qb = F.softmax(pb.log() / temperature, -1), F.softmax(qb.log() / temperature, -1)
    def kl(a, b):  # 0 log 0 = 0
        return (torch.special.xlogy(a, a) - torch.special.xlogy(a, b)).sum(-1)

    if kind == "forward_kl":
        d = kl(pb, qb)
    elif kind == "reverse_kl":
        d = kl(qb, pb)
    elif kind == "jsd":
        b = kw["beta"]
        m = b * pb + (1 - b) * qb
        d = b * kl(pb, m) + (1 - b) * kl(qb, m)
    elif kind == "skew_forward_kl":
        d = kl(pb, kw["lam"] * pb + (1 - kw["lam"]) * qb)
    elif kind == "skew_reverse_kl":
        d = kl(qb, kw["lam"] * qb + (1 - kw["lam"]) * pb)
    else:
        d = 0.5 * (pb - qb).abs().sum(-1)
    return d.mean()


def teacher_cache(teacher_logits, k):
    logp = F.log_softmax(teacher_logits.float(), -1)
    vals, ids = logp.topk(k, -1)
    return ids, vals, (1 - vals.exp().sum(-1)).clamp_min(0)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("k", [1, 8, 64])
def test_sparse_matches_dense_reference_with_gradients(kind, k):
    torch.manual_seed(k)
    V, N = 64, 12
    t = torch.randn(N, V) * 3
    s1 = (torch.randn(N, V) * 2).requires_grad_()
    s2 = s1.detach().double().clone().requires_grad_()
    kw = {"beta": 0.3, "lam": 0.1}
    ids, vals, tail = teacher_cache(t, k)
    ours = sparse_kd(s1, ids, vals, tail, 1.0, kind, **kw)
    ref = dense_bucket_reference(t, s2, k, kind, **kw)
    ours.backward()
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-5)
    torch.testing.assert_close(s1.grad.double(), s2.grad, rtol=1e-3, atol=1e-6)


def test_full_vocabulary_equals_plain_dense_kl():
    torch.manual_seed(0)
    V = 50
    t, s = torch.randn(7, V) * 2, torch.randn(7, V)
    ids, vals, tail = teacher_cache(t, V)
    dense = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1).mean()
    assert sparse_kd(s, ids, vals, tail).item() == pytest.approx(dense.item(), rel=1e-4)


def test_sparse_kl_is_zero_when_student_equals_teacher_and_positive_otherwise():
    torch.manual_seed(1)
    t = torch.randn(5, 40) * 2
    ids, vals, tail = teacher_cache(t, 6)
    assert sparse_kd(t, ids, vals, tail).item() == pytest.approx(0.0, abs=1e-5)
    assert sparse_kd(torch.randn(5, 40), ids, vals, tail).item() > 1e-3


def test_soft_label_kd_with_temperature_matches_dense():
    torch.manual_seed(2)
    t, s = torch.randn(9, 6) * 4, torch.randn(9, 6)
    T = 2.0
    p, logq = F.softmax(t / T, -1), F.log_softmax(s / T, -1)
    ref = (p * (p.log() - logq)).sum(-1).mean()
    assert soft_label_kd(s, t, T).item() == pytest.approx(ref.item(), rel=1e-5)
    # the scores are unnormalised: adding a per-row constant must not change anything
    assert soft_label_kd(s + 3.0, t - 7.0, T).item() == pytest.approx(ref.item(), rel=1e-5)


def test_jsd_limits_are_the_two_kls():
    torch.manual_seed(3)
    logp, logq = F.log_softmax(torch.randn(4, 10), -1), F.log_softmax(torch.randn(4, 10), -1)
    torch.testing.assert_close(divergence(logp, logq, "jsd", beta=0.0), divergence(logp, logq, "forward_kl"))
    torch.testing.assert_close(divergence(logp, logq, "jsd", beta=1.0), divergence(logp, logq, "reverse_kl"))


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("T", [0.5, 2.0])
def test_sparse_matches_dense_reference_at_temperature(kind, T):
    torch.manual_seed(7)
    V, N, k = 48, 10, 6
    t = torch.randn(N, V) * 3
    s1 = (torch.randn(N, V) * 2).requires_grad_()
    s2 = s1.detach().double().clone().requires_grad_()
    kw = {"beta": 0.7, "lam": 0.25}
    ids, vals, tail = teacher_cache(t, k)
    ours = sparse_kd(s1, ids, vals, tail, T, kind, **kw)
    ref = dense_bucket_reference(t, s2, k, kind, T, **kw)
    ours.backward()
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-5)
    torch.testing.assert_close(s1.grad.double(), s2.grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 4.0])
def test_a_student_equal_to_the_teacher_has_zero_loss_at_any_temperature(kind, T):
    torch.manual_seed(8)
    t = torch.randn(6, 300) * 2
    ids, vals, tail = teacher_cache(t, 8)
    assert sparse_kd(t, ids, vals, tail, T, kind, beta=0.4, lam=0.1).item() == pytest.approx(0.0, abs=1e-5)
    assert soft_label_kd(t[:, :5], t[:, :5], T, kind, beta=0.4, lam=0.1).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_soft_label_and_dense_kd_match_a_float64_reference_with_gradients(kind):
    """The divergence family on full distributions (soft labels, online KD) against float64 formulas."""
    torch.manual_seed(9)
    T, kw = 2.0, {"beta": 0.3, "lam": 0.2}
    t = torch.randn(7, 9) * 3
    s1 = torch.randn(7, 9).requires_grad_()
    s2 = s1.detach().double().clone().requires_grad_()
    ref = dense_bucket_reference(t / T, s2 / T, 9, kind, **kw)  # k = V: the plain dense divergence
    ours = soft_label_kd(s1, t, T, kind, **kw)
    ours.backward()
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(s1.grad.double(), s2.grad, rtol=1e-4, atol=1e-7)
    assert dense_kd(s1.detach(), t, T, kind, **kw).item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)


def test_reductions_sum_and_none():
    torch.manual_seed(10)
    t, s = torch.randn(5, 30) * 2, torch.randn(5, 30)
    ids, vals, tail = teacher_cache(t, 4)
    per_row = sparse_kd(s, ids, vals, tail, 2.0, "jsd", reduction="none", beta=0.5)
    assert per_row.shape == (5,)
    summed = sparse_kd(s, ids, vals, tail, 2.0, "jsd", reduction="sum", beta=0.5)
    assert per_row.sum().item() == pytest.approx(summed.item(), rel=1e-6)
    assert per_row.mean().item() == pytest.approx(sparse_kd(s, ids, vals, tail, 2.0, "jsd", beta=0.5).item(), rel=1e-6)
    soft_sum = soft_label_kd(s, t, 1.0, reduction="sum")
    assert soft_sum.item() == pytest.approx(5 * soft_label_kd(s, t, 1.0).item(), rel=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        soft_label_kd(s, t, reduction="max")


def test_loss_kwargs_maps_the_recipe_values_and_config_names_the_divergences():
    """The parameters' ranges are the recipe's (config checks them once); the names exist once, in config."""
    from distill import config

    assert loss_kwargs("forward_kl", 0.5, 0.1) == {}
    assert loss_kwargs("jsd", 0.2, 0.1) == {"beta": 0.2}
    assert loss_kwargs("skew_reverse_kl", 0.5, 0.3) == {"lam": 0.3}
    assert DIVERGENCES is config.DIVERGENCES and DIVERGENCES == typing.get_args(config.Loss)
    assert typing.get_args(config.OnPolicyLoss) == (*DIVERGENCES, config.SAMPLED)
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        divergence(torch.zeros(1, 2), torch.zeros(1, 2), "kl")
    with pytest.raises(UsageError, match=r"train.jsd_beta: expected a number in \[0, 1\], got 1.2"):
        config.load_recipe(config.Recipe(train=config.TrainConfig(loss="jsd", jsd_beta=1.2)))
    with pytest.raises(UsageError, match=r"train.skew_lambda: expected a number in \[0, 1\), got 1.0"):
        config.load_recipe(config.Recipe(train=config.TrainConfig(loss="skew_forward_kl", skew_lambda=1.0)))


def rows_with_filler(seed=11, V=40, N=6, k=8):
    """A cache whose row r has only real[r] teacher entries, the rest filler ids (unused by that row)
    at -inf as distill.teacher.common.rows_from_entries writes them; row 0 is all filler."""
    torch.manual_seed(seed)
    t = torch.randn(N, V) * 3
    ids, vals, _ = teacher_cache(t, k)
    real = [0, 1, 3, 5, 7, 8][:N]
    for r, n in enumerate(real):
        fill = [i for i in range(V) if i not in ids[r, :n].tolist()][: k - n]
        ids[r, n:], vals[r, n:] = torch.tensor(fill, dtype=ids.dtype), float("-inf")
    tail = (1 - vals.exp().sum(-1)).clamp_min(0)  # the real entries' tail, as the cache stores it
    return ids, vals, tail, real


@pytest.mark.parametrize("kind,kw", [("reverse_kl", {}), ("jsd", {"beta": 1.0}), ("skew_reverse_kl", {"lam": 0.0})])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_filler_slots_give_finite_reverse_kl_and_jsd_beta_1_with_finite_gradients(kind, kw, T):
    ids, vals, tail, _ = rows_with_filler()
    s = (torch.randn(len(ids), 40) * 2).requires_grad_()
    loss = sparse_kd(s, ids, vals, tail, T, kind, **kw)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 1e-3
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("T", [1.0, 0.5, 2.0])
def test_filler_slots_are_the_row_cached_without_them(kind, T):
    """Each divergence (and its gradient) on a row with filler equals it on the row with those slots
    removed (smaller k, same tail): the student's mass on filler ids is in its tail bucket."""
    ids, vals, tail, real = rows_with_filler()
    kw = {"beta": 0.3, "lam": 0.2}
    s = (torch.randn(len(ids), 40) * 2).requires_grad_()
    per_row = sparse_kd(s, ids, vals, tail, T, kind, reduction="none", **kw)
    per_row.sum().backward()
    assert per_row[0].item() == pytest.approx(0.0, abs=1e-6)  # all filler: both are one tail bucket
    torch.testing.assert_close(s.grad[0], torch.zeros(40), rtol=0, atol=1e-6)
    for r, n in enumerate(real[1:], start=1):
        s_r = s.detach()[r:r + 1].clone().requires_grad_()
        ref = sparse_kd(s_r, ids[r:r + 1, :n], vals[r:r + 1, :n], tail[r:r + 1], T, kind, **kw)
        ref.backward()
        assert per_row[r].item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-6), (r, n)
        torch.testing.assert_close(s.grad[r], s_r.grad[0], rtol=1e-5, atol=1e-6)


def zero_probability_teacher():
    torch.manual_seed(12)
    t = torch.randn(5, 6) * 2
    t[:, 2], t[0, 4] = float("-inf"), float("-inf")
    return t, torch.randn(5, 6)


@pytest.mark.parametrize("kind", [d for d in DIVERGENCES if d != "reverse_kl"])
@pytest.mark.parametrize("fn", [soft_label_kd, dense_kd])
def test_soft_labels_and_dense_kd_with_a_zero_probability_teacher_label(kind, fn):
    """A teacher score of -inf is a label at probability exactly 0, legitimate here (not masked):
    forward KL and the other bounded divergences stay finite and match the float64 formula, gradients too."""
    t, s = zero_probability_teacher()
    kw = {"beta": 0.3, "lam": 0.2}
    s1, s2 = s.clone().requires_grad_(), s.double().clone().requires_grad_()
    ours = fn(s1, t, 1.0, kind, **kw)
    ref = dense_bucket_reference(t, s2, 6, kind, **kw)
    ours.backward()
    ref.backward()
    assert torch.isfinite(ours) and ours.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(s1.grad.double(), s2.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind,kw", [("reverse_kl", {}), ("jsd", {"beta": 1.0}), ("skew_reverse_kl", {"lam": 0.0})])
def test_reverse_kl_of_a_zero_probability_teacher_label_is_infinite(kind, kw):
    """KL(q || p) with p = 0 where q > 0 is +inf: the documented value, not masked for soft labels."""
    t, s = zero_probability_teacher()
    assert soft_label_kd(s, t, 1.0, kind, **kw).item() == float("inf")
    assert dense_kd(s, t, 2.0, kind, **kw).item() == float("inf")
