"""torch.compile(fullgraph=True) traces FastRealNVP through the custom ops and matches eager."""

import torch

from fastnvp import FastRealNVP


def test_compiled_forward_and_backward_match_eager():
    torch._dynamo.reset()
    model = FastRealNVP.standard(2, 3, 16)
    x = torch.randn(64, 2)

    def loss_fn(inp):
        return -model.log_prob(inp).mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss_eager = loss_fn(x)
    grads_eager = torch.autograd.grad(loss_eager, list(model.parameters()))
    loss_compiled = compiled(x)
    grads_compiled = torch.autograd.grad(loss_compiled, list(model.parameters()))
    assert torch.allclose(loss_compiled, loss_eager, atol=1e-6)
    for a, b in zip(grads_compiled, grads_eager):
        assert torch.allclose(a, b, atol=1e-6)


def test_compiled_conditional_flow_matches_eager():
    torch._dynamo.reset()
    embedding = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh())
    model = FastRealNVP.standard(4, 3, 16, context=3, embedding=embedding)
    x, c = torch.randn(64, 4), torch.randn(64, 3)

    def loss_fn(inp, ctx):
        return -model.log_prob(inp, ctx).mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss_eager = loss_fn(x, c)
    grads_eager = torch.autograd.grad(loss_eager, list(model.parameters()))
    loss_compiled = compiled(x, c)
    grads_compiled = torch.autograd.grad(loss_compiled, list(model.parameters()))
    assert torch.allclose(loss_compiled, loss_eager, atol=1e-6)
    for a, b in zip(grads_compiled, grads_eager):
        assert torch.allclose(a, b, atol=1e-6)
