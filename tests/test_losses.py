"""Losses on the cached top-k support against dense reference computations, gradients included."""
import pytest
import torch
import torch.nn.functional as F

from distill.losses import DIVERGENCES, dense_kd, divergence, loss_kwargs, soft_label_kd, sparse_kd


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
    assert per_row.sum().item() == pytest.approx(sparse_kd(s, ids, vals, tail, 2.0, "jsd", reduction="sum", beta=0.5).item(), rel=1e-6)
    assert per_row.mean().item() == pytest.approx(sparse_kd(s, ids, vals, tail, 2.0, "jsd", beta=0.5).item(), rel=1e-6)
    assert soft_label_kd(s, t, 1.0, reduction="sum").item() == pytest.approx(5 * soft_label_kd(s, t, 1.0).item(), rel=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        soft_label_kd(s, t, reduction="max")


def test_loss_kwargs_checks_the_parameters():
    assert loss_kwargs("forward_kl", 0.5, 0.1) == {}
    assert loss_kwargs("jsd", 0.2, 0.1) == {"beta": 0.2}
    assert loss_kwargs("skew_reverse_kl", 0.5, 0.3) == {"lam": 0.3}
    with pytest.raises(ValueError, match="jsd_beta"):
        loss_kwargs("jsd", 1.2, 0.1)
    with pytest.raises(ValueError, match="skew_lambda"):
        loss_kwargs("skew_forward_kl", 0.5, 1.0)
    with pytest.raises(ValueError, match="unknown divergence"):
        loss_kwargs("kl", 0.5, 0.1)
