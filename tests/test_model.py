"""FastRealNVP is a drop-in for the reference: same outputs, gradients, state_dict and API."""

import pytest
import torch
from torch import nn

from fastnvp import FastRealNVP, RealNVP
from fastnvp.core.masks import alternating_masks


def pair(dim=3, layers=6, hidden=16, dtype=torch.float64):
    ref = RealNVP.standard(dim, layers, hidden).to(dtype)
    fast = FastRealNVP.standard(dim, layers, hidden).to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def custom_pair(dim=4, layers=3):
    """Non-standard nets (Tanh hidden activations) take the generic path."""
    masks = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float32)
    nets = lambda: nn.Sequential(nn.Linear(dim, 8), nn.Tanh(), nn.Linear(8, dim), nn.Tanh())
    nett = lambda: nn.Sequential(nn.Linear(dim, 8), nn.Tanh(), nn.Linear(8, dim))
    ref = RealNVP(nets, nett, masks).double()
    return ref, FastRealNVP.from_reference(ref)


@pytest.mark.parametrize("make", [pair, custom_pair], ids=["standard", "custom"])
def test_same_function(backend, make):
    ref, fast = make()
    x = torch.randn(11, ref.dim, dtype=torch.float64)
    z_ref, ld_ref = ref.f(x)
    z, ld = fast.f(x)
    assert torch.allclose(z, z_ref, atol=1e-12) and torch.allclose(ld, ld_ref, atol=1e-12)
    assert torch.allclose(fast.g(z_ref), ref.g(z_ref), atol=1e-12)
    assert torch.allclose(fast.log_prob(x), ref.log_prob(x), atol=1e-12)
    assert torch.equal(fast(x)[0], z)


def test_sample_with_same_generator():
    ref, fast = pair()
    a = ref.sample(13, generator=torch.Generator().manual_seed(3))
    b = fast.sample(13, generator=torch.Generator().manual_seed(3))
    assert a.shape == (13, 3) and torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("make", [pair, custom_pair], ids=["standard", "custom"])
def test_all_parameter_gradients(backend, make):
    ref, fast = make()
    x = torch.randn(9, ref.dim, dtype=torch.float64, requires_grad=True)
    loss_ref = -ref.log_prob(x).mean()
    grads_ref = torch.autograd.grad(loss_ref, [x, *ref.parameters()])
    x2 = x.detach().clone().requires_grad_()
    loss = -fast.log_prob(x2).mean()
    grads = torch.autograd.grad(loss, [x2, *fast.parameters()])
    assert len(grads) == len(grads_ref)
    for got, want in zip(grads, grads_ref):
        assert torch.allclose(got, want, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("depth", [1, 8, 50])
def test_round_trip(depth):
    fast = FastRealNVP.standard(2, depth, 32)
    x = torch.randn(300, 2)
    z, _ = fast.f(x)
    assert (fast.g(z) - x).abs().max() < 1e-4 * max(1, depth // 8)


def test_state_dict_keys_match_reference():
    ref, fast = pair()
    assert list(fast.state_dict()) == list(ref.state_dict())


def test_loading_other_masks_updates_the_split():
    ref = RealNVP.standard(4, 2, 8).double()
    ref.mask.copy_(torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]))
    fast = FastRealNVP.standard(4, 2, 8).double()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(5, 4, dtype=torch.float64)
    assert torch.allclose(fast.log_prob(x), ref.log_prob(x), atol=1e-12)


def test_from_reference_copies():
    ref, _ = pair()
    fast = FastRealNVP.from_reference(ref)
    with torch.no_grad():
        fast.s[0][0].weight.add_(1.0)
    assert not torch.equal(fast.s[0][0].weight, ref.s[0][0].weight)


BAD_CALLS = [
    (lambda m: m.f(torch.randn(5)), ValueError, r"x must have shape \(N, 3\)"),
    (lambda m: m.f(torch.randn(5, 2)), ValueError, r"x must have shape \(N, 3\): got 2"),
    (lambda m: m.f(torch.randn(5, 3, dtype=torch.float64)), TypeError, "x has dtype"),
    (lambda m: m.f(torch.ones(5, 3, dtype=torch.long)), TypeError, "x must have a floating"),
    (lambda m: m.f(torch.randn(0, 3)), ValueError, "x must have at least one row"),
    (lambda m: m.f(torch.randn(5, 3, device="meta")), ValueError, "x is on meta"),
    (lambda m: m.g(torch.randn(5, 4)), ValueError, r"z must have shape \(N, 3\)"),
    (lambda m: m.log_prob([[1.0, 2.0, 3.0]]), TypeError, "x must be a torch.Tensor"),
    (lambda m: m.sample(0), ValueError, "num_samples must be >= 1"),
    (lambda m: m.sample(2.5), TypeError, "num_samples must be an int"),
]


@pytest.mark.parametrize("cls", [RealNVP, FastRealNVP])
@pytest.mark.parametrize("call, exc, match", BAD_CALLS)
def test_bad_input_is_named(cls, call, exc, match):
    model = cls.standard(3, 2, 8)
    with pytest.raises(exc, match=match):
        call(model)


@pytest.mark.parametrize("cls", [RealNVP, FastRealNVP])
@pytest.mark.parametrize(
    "masks, exc, match",
    [
        (torch.tensor([[0.0, 2.0]]), ValueError, "only 0 and 1"),
        (torch.tensor([[1.0, 1.0]]), ValueError, r"masks\[0\] transforms no feature"),
        (torch.tensor([[0.0, 1.0], [0.0, 0.0]]), ValueError, r"masks\[1\] keeps no feature"),
        (torch.tensor([0.0, 1.0]), ValueError, r"masks must have shape \(L, D\)"),
        (torch.tensor([[1.0], [0.0]]), ValueError, "D >= 2"),
        ("01", TypeError, "masks must be a tensor"),
    ],
)
def test_bad_masks_are_named(cls, masks, exc, match):
    net = lambda: nn.Linear(2, 2)
    with pytest.raises(exc, match=match):
        cls(net, net, masks)


@pytest.mark.parametrize("cls", [RealNVP, FastRealNVP])
def test_bad_factories_are_named(cls):
    masks = alternating_masks(2, 2)
    with pytest.raises(TypeError, match="nets must be a zero-argument callable"):
        cls(None, lambda: nn.Linear(2, 2), masks)
    with pytest.raises(TypeError, match=r"nett\(\) must return an nn.Module"):
        cls(lambda: nn.Linear(2, 2), lambda: "net", masks)


@pytest.mark.parametrize("context", [None, 2], ids=["unconditional", "conditional"])
def test_copies_and_pickles_after_cached_calls_and_a_step(context):
    """A model whose caches hold no-grad weight packs deep-copies, pickles and torch.saves
    after an optimizer step (the copies rebuild their caches and compute the same function)."""
    import copy
    import io
    import pickle

    torch.manual_seed(0)
    model = FastRealNVP.standard(4, 4, 16, context=context)
    x = torch.randn(32, 4)
    c = None if context is None else torch.randn(32, context)
    with torch.no_grad():
        model.log_prob(x, context=c)  # fills the no-grad pack cache
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    (-model.log_prob(x, context=c).mean()).backward()
    opt.step()  # the cached pack's parameters change in place
    with torch.no_grad():
        expected = model.log_prob(x, context=c)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [
        copy.deepcopy(model),
        pickle.loads(pickle.dumps(model)),
        torch.load(buffer, weights_only=False),
    ]
    for clone in copies:
        with torch.no_grad():
            torch.testing.assert_close(clone.log_prob(x, context=c), expected)
        # the copy's split hook still runs on load_state_dict
        clone.load_state_dict(model.state_dict())
        assert clone._num_kept == model._num_kept
