"""Assignment A2 (LoRA by hand, assignments/A2-lora.md): the autograder. `python -m pytest -m a2`.

No language model: a LoRA layer on a 3 -> 2 linear map with hand-set weights (outputs written
out by hand), and injection into a small named module tree. Ranks and alphas vary, with alpha
over r far from r over alpha, so the scale is pinned without the PEFT cross-check."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora

pytestmark = pytest.mark.a2


def _layer(r, alpha, dropout=0.0, bias=True):
    """W = [[1, 0, 2], [0, -1, 1]], b = [0.5, -0.5]; A and B set so that B A x is easy by hand."""
    base = nn.Linear(3, 2, bias=bias)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]]))
        if bias:
            base.bias.copy_(torch.tensor([0.5, -0.5]))
    layer = lora.LoRALinear(base, r=r, alpha=alpha, dropout=dropout)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]] + [[0.0] * 3] * (r - 2)))
        layer.lora_B.weight.copy_(torch.tensor([[1.0, 0.0] + [0.0] * (r - 2), [0.0, 2.0] + [0.0] * (r - 2)]))
    return layer


X = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 1.0]])
# W x + b:  [1 + 6 + 0.5, -2 + 3 - 0.5] = [7.5, 0.5] ;  [0 + 2 + 0.5, 1 + 1 - 0.5] = [2.5, 1.5]
# B A x:    A x = [3, 3] -> B: [3, 6]                ;  A x = [-1, 1] -> B: [-1, 2]
BASE = torch.tensor([[7.5, 0.5], [2.5, 1.5]])
BAX = torch.tensor([[3.0, 6.0], [-1.0, 2.0]])


@pytest.mark.parametrize("r,alpha", [(2, 8), (4, 2), (2, 2)])
def test_forward_by_hand(r, alpha):
    layer = _layer(r, alpha)
    assert layer.scaling == pytest.approx(alpha / r)
    torch.testing.assert_close(layer(X), BASE + (alpha / r) * BAX)
    with torch.no_grad():
        layer.lora_B.weight.zero_()
    torch.testing.assert_close(layer(X), BASE)                        # B = 0: the frozen layer exactly


def test_forward_without_bias_and_with_batch_dims():
    layer = _layer(2, 6, bias=False)
    x = X.reshape(1, 2, 3).expand(4, 2, 3)                            # (batch, sequence, features)
    want = (BASE - torch.tensor([0.5, -0.5])) + 3.0 * BAX
    torch.testing.assert_close(layer(x), want.expand(4, 2, 2))


def test_dropout_is_on_the_adapter_input_only():
    """In training mode the adapter sees dropout(x) (one mask of x's shape, drawn by the layer's
    dropout), the frozen path sees x itself; in eval mode there is no dropout."""
    layer = _layer(2, 4, dropout=0.5).train()
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, -1.0, 1.0], [2.0, 2.0, -2.0], [1.0, 1.0, 1.0]])
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.5, training=True)
    torch.manual_seed(7)
    got = layer(x)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    want = x @ layer.base_layer.weight.T + layer.base_layer.bias + 2.0 * dropped @ A.T @ B.T
    torch.testing.assert_close(got, want)
    assert not torch.equal(dropped, x)                                # the mask really dropped something
    layer.eval()
    torch.testing.assert_close(layer(x), x @ layer.base_layer.weight.T + layer.base_layer.bias + 2.0 * x @ A.T @ B.T)


@pytest.mark.parametrize("r,alpha", [(2, 8), (4, 2)])
def test_delta_by_hand(r, alpha):
    layer = _layer(r, alpha)
    # B A = [[1, 1, 0], [0, 0, 2]]
    want = (alpha / r) * torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    torch.testing.assert_close(layer.delta(), want)
    assert layer.delta().shape == layer.base_layer.weight.shape


@pytest.mark.parametrize("r,alpha", [(2, 8), (4, 2)])
def test_merge_folds_the_update_in_and_unmerge_takes_it_out(r, alpha):
    layer = _layer(r, alpha).eval()
    w0 = layer.base_layer.weight.detach().clone()
    unmerged = layer(X)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.base_layer.weight.detach(),
                               w0 + (alpha / r) * torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 2.0]]))
    torch.testing.assert_close(layer(X), unmerged)                    # the same function, merged
    layer.merge()                                                     # a second merge changes nothing
    torch.testing.assert_close(layer(X), unmerged)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight.detach(), w0)
    torch.testing.assert_close(layer(X), unmerged)
    layer.unmerge()                                                   # unmerging an unmerged layer: no change
    torch.testing.assert_close(layer.base_layer.weight.detach(), w0)
    torch.testing.assert_close(layer(X), BASE + (alpha / r) * BAX)


def test_merge_on_a_bf16_base_keeps_its_dtype():
    layer = _layer(2, 8)
    layer.base_layer.to(torch.bfloat16)
    layer.merge()
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    out = layer(X.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), BASE + 4.0 * BAX, atol=0.25, rtol=0.02)
    layer.unmerge()
    torch.testing.assert_close(layer(X.to(torch.bfloat16)).float(), BASE + 4.0 * BAX, atol=0.25, rtol=0.02)


# ----------------------------------------------------------------------------------------
# inject: which modules get wrapped, and what is left trainable
# ----------------------------------------------------------------------------------------

class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.xq_proj = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(self.q_proj(x) + self.k_proj(x) + self.xq_proj(x))


class Toy(nn.Module):
    """Names: layers.{0,1}.{q_proj, k_proj, xq_proj, norm}, q_proj (top level), k_proj (an
    Embedding: the right name, not a Linear), head."""
    def __init__(self):
        super().__init__()
        self.k_proj = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([Attn(), Attn()])
        self.q_proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        h = self.k_proj(ids)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.q_proj(h))


def _toy():
    torch.manual_seed(0)
    return Toy()


IDS = torch.tensor([[1, 2, 3], [4, 5, 9]])


def test_inject_wraps_exactly_the_matching_linears():
    m = _toy()
    before = m(IDS).detach()
    bases = {n: mod for n, mod in m.named_modules() if isinstance(mod, nn.Linear)}
    names = lora.inject(m, targets=("q_proj", "k_proj"), r=2, alpha=4, dropout=0.0)
    assert names == ["layers.0.q_proj", "layers.0.k_proj", "layers.1.q_proj", "layers.1.k_proj", "q_proj"]
    for n in names:
        wrapped = m.get_submodule(n)
        assert isinstance(wrapped, lora.LoRALinear), n
        assert wrapped.base_layer is bases[n], n                      # the original layer, wrapped in place
        assert wrapped.r == 2 and wrapped.scaling == pytest.approx(2.0)
    assert isinstance(m.k_proj, nn.Embedding) and isinstance(m.head, nn.Linear)
    for k in (0, 1):
        assert type(m.layers[k].xq_proj) is nn.Linear                  # "xq_proj" does not end in ".q_proj"
    assert set(lora.lora_modules(m)) == set(names)
    torch.testing.assert_close(m(IDS), before)                        # a fresh adapter changes nothing


def test_inject_freezes_everything_but_the_adapters():
    m = _toy()
    lora.inject(m, targets=("q_proj",), r=3, alpha=3, dropout=0.0)
    adapters = {id(p) for p in lora.trainable_parameters(m)}
    assert len(adapters) == 2 * 3                                     # A and B of 3 wrapped layers
    for n, p in m.named_parameters():
        assert p.requires_grad == (id(p) in adapters), n
    with torch.no_grad():
        for mod in lora.lora_modules(m).values():
            mod.lora_B.weight.normal_()
    m(IDS).sum().backward()
    assert all(p.grad is not None for p in lora.trainable_parameters(m))
    assert all(p.grad is None for n, p in m.named_parameters() if "lora_" not in n)


def test_inject_targets_by_exact_name_and_follows_the_model_mode():
    m = _toy().eval()
    assert lora.inject(m, targets=["head"], r=2, alpha=2, dropout=0.5) == ["head"]
    assert not m.head.training and not m.head.lora_dropout.training   # an eval model gets eval adapters
    with torch.no_grad():
        m.head.lora_B.weight.normal_()
    assert torch.equal(m(IDS), m(IDS))                                # no dropout: deterministic
    t = _toy().train()
    lora.inject(t, targets=["head"], r=2, alpha=2, dropout=0.5)
    assert t.head.training and t.head.lora_dropout.training


def test_inject_refuses_targets_that_match_nothing():
    with pytest.raises(ValueError, match="no nn.Linear module matches"):
        lora.inject(_toy(), targets=["v_proj"])
    with pytest.raises(ValueError, match="no nn.Linear module matches"):
        lora.inject(_toy(), targets=["proj"])                          # a suffix of a name is not a match


def test_matches_by_hand():
    assert lora._matches("model.layers.3.self_attn.q_proj", ["q_proj"])
    assert lora._matches("q_proj", ["q_proj"])
    assert not lora._matches("model.layers.3.self_attn.xq_proj", ["q_proj"])
    assert not lora._matches("model.q_proj.extra", ["q_proj"])
    assert lora._matches("a.v_proj", ["q_proj", "v_proj"]) and not lora._matches("a.o_proj", ["q_proj", "v_proj"])


def test_a_gradient_step_trains_the_low_rank_path_only():
    """One SGD step of lr 1 on a squared output: B moves by -scaling * grad_z (A x)^T, W not at all."""
    layer = _layer(2, 8)
    x = X[:1]
    for p in (layer.lora_A.weight, layer.lora_B.weight):
        p.requires_grad_(True)
    out = layer(x)
    (0.5 * out.pow(2).sum()).backward()
    assert layer.base_layer.weight.grad is None
    # dL/dout = out; dL/dB = scaling * out^T (A x) = 4 * [[out0 * 3, out0 * 3], [out1 * 3, out1 * 3]]
    o = (BASE + 4.0 * BAX)[0]
    torch.testing.assert_close(layer.lora_B.weight.grad, 4.0 * torch.outer(o, torch.tensor([3.0, 3.0])))
    assert math.isfinite(layer.lora_A.weight.grad.sum().item())
