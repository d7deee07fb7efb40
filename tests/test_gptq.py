"""GPTQ into IQ4_NL blocks: the bytes are what ggml reads, and the calibrated rounding does what it is for."""
import numpy as np
import pytest
import torch

from distill.export.gptq import block_scales, input_hessians, quantize_iq4_nl

gguf = pytest.importorskip("gguf")


def _correlated(rows=48, cols=128, tokens=3000, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    x = rng.standard_normal((tokens, cols)) @ rng.standard_normal((cols, cols))  # inputs with structure
    return w, x, torch.tensor(x.T @ x / len(x))


@pytest.mark.parametrize("calibrated", [False, True])
def test_blocks_dequantize_in_ggml_to_the_returned_weights(calibrated):
    w, _, h = _correlated()
    blocks, deq = quantize_iq4_nl(w, h if calibrated else None)
    assert blocks.dtype == np.uint8 and blocks.shape == (48, 128 // 32 * 18)
    ggml = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.IQ4_NL)
    np.testing.assert_array_equal(ggml, deq)


def test_gptq_keeps_the_layer_output_closer_than_rounding_to_nearest():
    w, x, h = _correlated()
    _, rtn = quantize_iq4_nl(w)
    _, gptq = quantize_iq4_nl(w, h)

    def out_err(q):
        return np.linalg.norm(x @ (w - q).T) / np.linalg.norm(x @ w.T)

    assert out_err(gptq) < 0.85 * out_err(rtn), (out_err(gptq), out_err(rtn))
    assert np.abs(w - gptq).mean() > np.abs(w - rtn).mean()  # the weights themselves move further


def test_rows_are_independent_so_the_rotary_row_permutation_commutes():
    w, _, h = _correlated()
    perm = np.random.default_rng(1).permutation(len(w))
    a, _ = quantize_iq4_nl(w[perm], h)
    b, _ = quantize_iq4_nl(w, h)
    np.testing.assert_array_equal(a, b[perm])


def test_block_scale_is_no_worse_than_the_extreme_value_scale():
    w = torch.tensor(np.random.default_rng(2).standard_normal((200, 32)))
    levels = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                          dtype=torch.float64)

    def err(d):
        q = levels[torch.argmin((w[:, :, None] / d[:, None, None] - levels).abs(), -1)]
        return ((q * d[:, None] - w) ** 2).sum(1)

    naive = (w.gather(1, w.abs().argmax(1, keepdim=True))[:, 0] / -127).half().double()
    assert bool((err(block_scales(w)) <= err(naive) + 1e-12).all())
    assert torch.equal(block_scales(w), block_scales(w).half().double())  # stored exactly as fp16


def test_input_hessians_equal_the_direct_product():
    torch.manual_seed(0)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 16)
            self.proj = torch.nn.Linear(16, 8)

        def forward(self, ids):
            return self.proj(self.emb(ids))

    model = Tiny()
    seqs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    h = input_hessians(model, seqs, ["proj"])["proj"]
    x = torch.cat([model.emb(torch.tensor(s)) for s in seqs]).double()
    torch.testing.assert_close(h, x.T @ x / len(x))
    assert not model.proj._forward_hooks  # hooks removed
