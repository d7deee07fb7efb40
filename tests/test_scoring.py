"""Prefix-tree label scoring: the same numbers and gradients as one plain forward per label, fewer tokens."""
import pytest
import torch

from distill.models.scoring import label_logprobs, trie_batch, trie_layout

VOCAB = 64
PROMPTS = [[1, 5, 9, 30, 44], [7, 8], [3, 3, 3, 3, 3, 3, 3, 12]]  # different lengths: left padding
LABEL_SETS = {
    "shared_prefixes": [[10, 11, 12, 2], [10, 11, 13, 2], [10, 14, 2], [15, 16, 2]],
    "prefix_of_another": [[10, 11], [10, 11, 12, 2], [10, 11, 12], [20]],
    "identical_first_tokens": [[10, 2], [10, 3], [10, 4], [10, 5, 6]],
    "no_sharing": [[21, 2], [22], [23, 24, 25]],
}


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation=request.param)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # larger logits than the default init, so distributions are not flat
        m.model.embed_tokens.weight.normal_(0, 1.0)
        m.lm_head.weight.normal_(0, 0.5)
    return m


def per_label_scores(model, prompts, labels) -> torch.Tensor:
    """The plain computation: one causal forward over prompt + answer per (prompt, label); differentiable."""
    rows = []
    for p in prompts:
        row = []
        for lab in labels:
            logp = torch.log_softmax(model(torch.tensor([p + lab])).logits[0].float(), -1)
            pred = torch.arange(len(p) - 1, len(p) + len(lab) - 1)
            row.append(logp[pred, torch.tensor(lab)].sum())
        rows.append(torch.stack(row))
    return torch.stack(rows)


@pytest.mark.parametrize("name", list(LABEL_SETS))
def test_trie_scores_equal_one_forward_per_label(model, name):
    labels = LABEL_SETS[name]
    with torch.no_grad():
        got = label_logprobs(model, PROMPTS, labels, pad_id=0)
        ref = per_label_scores(model, PROMPTS, labels)
    assert got.shape == (len(PROMPTS), len(labels)) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert (got[:, None] - got[:, :, None]).abs().max() > 1e-3  # labels are told apart, not all equal


def weight_grad(model, scores) -> torch.Tensor:
    """The gradient of a fixed random weighting of `scores()` ([prompts, labels]) in one weight matrix."""
    model.zero_grad()
    s = scores()
    (s * torch.randn(s.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    return grad


def test_gradients_equal_the_per_label_computation(model):
    labels = LABEL_SETS["prefix_of_another"]
    grads = [weight_grad(model, lambda: label_logprobs(model, PROMPTS, labels, pad_id=0)),
             weight_grad(model, lambda: per_label_scores(model, PROMPTS, labels))]
    assert grads[0].abs().max() > 1e-3
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(LABEL_SETS))
def test_layout_feeds_each_answer_prefix_that_goes_on_once(name):
    labels = LABEL_SETS[name]
    layout = trie_layout(labels)
    goes_on = {tuple(lab[:k]) for lab in labels for k in range(1, len(lab))}  # prefixes some answer extends
    assert layout.n_fed == len(goes_on)
    assert layout.n_nodes == len({tuple(lab[:k]) for lab in labels for k in range(1, len(lab) + 1)})
    assert sorted(set(layout.col.tolist())) == list(range(layout.n_fed + 1))  # every kept logits row is read
    ids, allowed, positions = trie_batch(PROMPTS, layout, pad_id=0)
    P = max(map(len, PROMPTS))
    S = P + layout.n_fed
    assert ids.shape == positions.shape == (3, S) and allowed.shape == (3, S, S)


def test_inner_node_sees_its_prompt_and_ancestors_at_its_depth():
    labels = LABEL_SETS["shared_prefixes"]  # inner nodes fed: 10, 11, 12, 13, 14, 15, 16; the four 2s are leaves
    layout = trie_layout(labels)
    assert layout.fed_tokens.tolist() == [10, 11, 12, 13, 14, 15, 16]
    ids, allowed, positions = trie_batch(PROMPTS, layout, pad_id=0)
    P = max(map(len, PROMPTS))
    r = 3  # the node for [10, 11, 13]
    assert ids[0, P + r] == 13 and positions[:, P + r].tolist() == [len(p) + 2 for p in PROMPTS]
    assert allowed[0, P + r, P:].nonzero().flatten().tolist() == [0, 1, r]
    assert allowed[1, P + r, :P].tolist() == [False] * (P - 2) + [True, True]  # row 1's prompt, not its padding


def test_logits_kept_once_per_predicting_position(model):
    seen = {}

    class Spy(torch.nn.Module):  # a wrapper in the way DDP or PEFT would be: the call must go through it
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kw):
            seen.update(kw)
            return self.inner(**kw)

    labels = LABEL_SETS["prefix_of_another"]  # nodes 10, 11, 12, 2, 20: 10, 11 and 12 have children
    with torch.no_grad():
        label_logprobs(Spy(model), PROMPTS, labels, pad_id=0)
    P = max(map(len, PROMPTS))
    assert seen["input_ids"].shape[1] == P + 3  # 10, 11, 12 fed; the leaves 2 and 20 only read
    assert seen["logits_to_keep"] == 4  # the last prompt token and the three fed nodes


def test_empty_answer_is_refused():
    with pytest.raises(ValueError, match="label 1 has an empty answer"):
        trie_layout([[1, 2], []])


def test_predict_scores_sorts_by_length_and_returns_rows_in_input_order(model):
    """predict_scores batches prompts longest first; each row must still be its own prompt's scores."""
    from types import SimpleNamespace

    from distill.evaluate.evaluation import predict_scores

    labels = LABEL_SETS["shared_prefixes"]
    prompts = PROMPTS + [[4, 6], [9, 9, 9, 9, 9, 1], [2]]
    got = predict_scores(model, [SimpleNamespace(prompt=p) for p in prompts], labels, pad_id=0, batch_size=2)
    with torch.no_grad():
        ref = per_label_scores(model, prompts, labels)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_length_grouped_order_holds_every_example_once_in_batches_of_one_length():
    import numpy as np

    from distill.train.data import LengthGroupedOrder
    from distill.train.state import DataOrder

    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 80, size=1003).tolist()
    order = LengthGroupedOrder(1003, 16, 0, lengths)
    plain = DataOrder(1003, 16, 0)
    pad = {}
    for name, o in (("grouped", order), ("plain", plain)):
        seen = []
        for epoch in range(2):
            batches = [o.batch(epoch * o.per_epoch + i) for i in range(o.per_epoch)]
            flat = [j for b in batches for j in b]
            assert sorted(flat) == list(range(1003))  # every example once an epoch
            assert [len(b) for b in batches] == [16] * 62 + [11]  # the short batch last
            seen.append(flat)
        assert seen[0] != seen[1]  # a new order each epoch
        pad[name] = np.mean([max(lengths[j] for j in b) * len(b) for b in batches]) / np.mean(
            [sum(lengths[j] for j in b) for b in batches])
    assert pad["grouped"] < 1.1 < 1.3 < pad["plain"]  # padded tokens / real tokens
    again = LengthGroupedOrder(1003, 16, 0, lengths)
    assert [again.batch(i) for i in range(70)] == [order.batch(i) for i in range(70)]  # seeded: resume-safe
    assert order.layout != plain.layout  # a checkpoint records the grouping


SHARED = [1, 5, 9, 30, 44, 7]  # a system turn every prompt begins with: run once, not once a row
SHARED_PROMPTS = [SHARED + [8, 12], SHARED + [3], SHARED + [3, 3, 3, 3, 20, 21]]


def test_a_shared_prefix_is_run_once_with_the_same_scores(model):
    from distill.models.scoring import last_logits, shared_prefix_len, target_logits

    labels = LABEL_SETS["shared_prefixes"]
    seqs = [p + [40 + i] for i, p in enumerate(SHARED_PROMPTS)]
    assert shared_prefix_len(model, SHARED_PROMPTS, 99) == len(SHARED)
    assert shared_prefix_len(model, SHARED_PROMPTS, 3) == 0 and shared_prefix_len(model, PROMPTS, 99) == 0
    with torch.no_grad():
        got = label_logprobs(model, SHARED_PROMPTS, labels, pad_id=0)
        ref = per_label_scores(model, SHARED_PROMPTS, labels)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        got = last_logits(model, seqs, 2, pad_id=0)
        ref = torch.stack([model(torch.tensor([s])).logits[0, -2:] for s in seqs])
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        # targets inside the shared prefix bound it: the position predicting one must be fed
        for positions in ([[7, 8], [6], [6, 9, 11]], [[3, 7], [6], [6, 9]]):
            got = target_logits(model, seqs, positions, pad_id=0)
            ref = torch.cat([model(torch.tensor([s])).logits[0, torch.tensor(p) - 1] for s, p in zip(seqs, positions)])
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_a_shared_prefix_passes_each_rows_gradient_back(model, monkeypatch):
    """A training step shares the prefix too: the weights' gradient equals feeding every row whole."""
    import distill.models.scoring as scoring

    labels = LABEL_SETS["prefix_of_another"]
    grads = []
    for least in (scoring.MIN_SHARED_PREFIX, 10 ** 9):  # shared, then never shared
        monkeypatch.setattr(scoring, "MIN_SHARED_PREFIX", least)
        grads.append(weight_grad(model, lambda: label_logprobs(model, SHARED_PROMPTS, labels, pad_id=0)))
    assert grads[0].abs().max() > 1e-3
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=0)


def test_gradient_checkpointing_in_training_feeds_every_row_whole(model):
    from distill.models.scoring import shared_prefix_len

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        assert shared_prefix_len(model, SHARED_PROMPTS, 99) == len(SHARED)  # eval mode: layers keep a cache
        model.train()
        assert shared_prefix_len(model, SHARED_PROMPTS, 99) == 0  # they would drop it
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
