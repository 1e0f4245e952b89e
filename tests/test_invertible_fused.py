"""Invertible backward of fused-layer models: the same kernel and precision as the forward.

A layer whose forward ran the fused-layer op (``fused="layer"``, or ``"auto"`` on CUDA) must be
recomputed in invertible backward with that op's inverse and forward and differentiated with its
fused backward, in the model's ``precision``; otherwise backward differentiates another function
(fp32 matmuls) than the one the forward computed (rounded matmul operands).

The oracle is the fused layer's float64 PyTorch math, chained layer by layer without
reconstruction: ``fastnvp.ops.fused_layer.torch_layer`` forward, then ``torch_layer_backward`` from
each layer's stored output, with the model's precision. "Same rounding" means, per precision:

- ``bf16``: every matmul operand the kernels round is rounded to the nearest bf16 value (the H x H
  and last Linears and, in backward, the dots through W3 and W2 and the dW2 / dW3 GEMMs; the
  first Linear is an fp32 outer product at these K1 <= 4), accumulation in float64. On CPU tensors
  the kernels run their emulated bf16 mode (``PREC_BF16_EMULATED``: operands rounded to bf16,
  fp32 accumulation), so the kernels and the oracle differ by fp32 rounding only, plus the rare
  operand whose fp32 and float64 values round to neighbouring bf16 values.
- ``tf32``: no rounding. Triton's interpreter ignores ``input_precision`` in ``tl.dot``
  (``triton/runtime/interpreter.py``, ``create_dot`` is a float32 ``np.matmul``; tf32 rounding
  happens there only for TMA descriptor loads, which the kernels do not use), so on this backend
  the tf32 kernels compute fp32 dots, exactly as ``ieee`` does
  (:func:`test_interpreter_tf32_dots_are_fp32` checks this premise), and the PyTorch path runs
  tf32 as fp32 too. On a GPU, tf32 would round operands to 10 mantissa bits; this oracle does not
  model that.

Errors are ``max|a - b| / max|b|`` per tensor (:func:`rel_err`); the tolerances
(:func:`tolerance`) are

- tf32: 1e-5 for every tensor, near fp32 rounding (the kernels against the float64 oracle
  measure <= 1.3e-6, invertible against standard mode <= 7e-7);
- bf16: 1e-3, the size of one rounding flip: an operand whose two computations (fp32 kernel,
  float64 oracle; or the forward's input and the reconstructed one, equal to ~1e-7) straddle a
  bf16 rounding midpoint rounds to neighbouring bf16 values, which moved a gradient by up to
  3.7e-4 in a sweep of 16 seeds (without a flip the errors are <= 1e-6). The bug (recomputing
  bf16 layers in fp32) gave 4e-3 to 0.26 in that sweep; at the default reconstruction tolerance
  the old code's backward raised ``ReconstructionError`` on the seeds below instead (the
  reconstructed input drifted by ~2e-3), at a looser one it returned the wrong gradients.
- bf16, dW2 of the H x H Linear: 1e-2. The fused backward rounds its result to bf16 (the launcher
  multiplies bf16 tensors: ``kernels/fused_layer_backward.py``, ``_reduce``), where the PyTorch
  path and the oracle accumulate in fp32 and keep the sum: 2e-3 to 3.3e-3 apart, and one
  flip of that output rounding moves an element by a bf16 ulp between invertible and standard mode.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastnvp.engine.gpu.fused as gpu_fused
import fastnvp.engine.invertible as invertible
import fastnvp.ops.fused_layer as fl
from fastnvp.core.conditioner import match_standard_mlp, standard_net
from fastnvp.core.masks import alternating_masks
from fastnvp.engine.plan import Policy
from fastnvp.flows.fast_realnvp import FastRealNVP

HIDDEN = 16  # the fused layer needs a power-of-two hidden width >= 16


def tolerance(precision: str, name: str) -> float:
    """Allowed ``rel_err`` of gradient ``name`` ("x" or a parameter's name) (module doc)."""
    if precision != "bf16":
        return 1e-5
    return 1e-2 if name.endswith(".2.weight") else 1e-3


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|; inf when ``got`` is not finite."""
    got, ref = got.detach().double(), ref.detach().double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def make_twins(dim, num_layers, precision, fused="layer", seed=0):
    """A float32 fused model in standard and in invertible memory mode, same weights."""
    torch.manual_seed(seed)
    opts = {"fused": fused, "precision": precision}
    std = FastRealNVP.standard(dim, num_layers, HIDDEN, **opts)
    with torch.no_grad():  # larger weights than the default init, so every term matters
        for p in std.parameters():
            p.add_(0.2 * torch.randn_like(p))
    inv = FastRealNVP.standard(dim, num_layers, HIDDEN, memory="invertible", **opts)
    inv.load_state_dict(std.state_dict())
    return std, inv


def nll(z, log_det):
    return (0.5 * z.pow(2).sum(dim=1) - log_det).mean()


def _named_grads(model):
    return [(name, p.grad) for name, p in model.named_parameters()]


def model_grads(model, x):
    """``(z, log_det, grad_x, {parameter name: grad})`` of the NLL through ``model.f``."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    z, log_det = model.f(x)
    nll(z, log_det).backward()
    grads = dict(_named_grads(model))
    return z.detach(), log_det.detach(), x.grad, grads


def oracle_grads(model, x, precision):
    """The NLL's gradients from the fused layer's float64 math with ``precision``'s rounding.

    Forward with :func:`fastnvp.ops.fused_layer.torch_layer` (storing every layer's output), then
    :func:`fastnvp.ops.fused_layer.torch_layer_backward` from the last layer down; the split-weight
    gradients are scattered back to the modules' parameter shapes.
    """
    slope = fl.flow_slope(model)
    layers = []
    for i in range(model.num_layers):
        kept, transformed, sw, tw = fl.layer_weights(model, i)
        sw = [w.detach().double() for w in sw]
        tw = [w.detach().double() for w in tw]
        layers.append((kept, transformed, sw, tw))
    h, log_det, outs = x.double(), 0.0, []
    for kept, transformed, sw, tw in layers:
        h, ld = fl.torch_layer(h, kept, transformed, sw, tw, slope, False, precision)
        outs.append(h)
        log_det = log_det + ld
    n = x.shape[0]
    g = h / n
    gl = torch.full((n,), -1.0 / n, dtype=torch.float64)
    names = {id(p): name for name, p in model.named_parameters()}
    grads = {}
    for i in reversed(range(model.num_layers)):
        kept, transformed, sw, tw = layers[i]
        g, *gw = fl.torch_layer_backward(
            outs[i], g, gl, kept, transformed, sw, tw, slope, False, precision
        )
        for net, split in ((model.s[i], gw[:6]), (model.t[i], gw[6:])):
            mlp = match_standard_mlp(net, model.dim)
            gw1, gb1, gw2, gb2, gw3, gb3 = split
            full = {
                mlp.lin1.weight: torch.zeros(HIDDEN, model.dim, dtype=torch.float64).index_copy(
                    1, kept, gw1
                ),
                mlp.lin1.bias: gb1,
                mlp.lin2.weight: gw2,
                mlp.lin2.bias: gb2,
                mlp.lin3.weight: torch.zeros(model.dim, HIDDEN, dtype=torch.float64).index_copy(
                    0, transformed, gw3
                ),
                mlp.lin3.bias: torch.zeros(model.dim, dtype=torch.float64).index_copy(
                    0, transformed, gb3
                ),
            }
            for p, gp in full.items():
                grads[names[id(p)]] = gp
    return h, log_det, g, grads


def grad_errors(got, ref) -> dict[str, float]:
    """``rel_err`` of the input gradient ("x") and of every parameter gradient, by name."""
    (gx, gp), (rx, rp) = got, ref
    assert gp.keys() == rp.keys()
    return {"x": rel_err(gx, rx), **{k: rel_err(gp[k], rp[k]) for k in rp}}


def assert_grads_close(got, ref, precision: str) -> None:
    errors = grad_errors(got, ref)
    bad = {k: e for k, e in errors.items() if not e <= tolerance(precision, k)}
    assert not bad, f"gradient errors above the {precision} tolerance: {bad}"


def fused_twins_and_grads(dim, num_layers, precision, rows, seed=0):
    """Standard and invertible twins, an input, and ``(grad_x, grads)`` of standard,
    invertible and the oracle; the forward outputs are checked on the way.

    The invertible twin's reconstruction tolerance is loose (0.1), so that a backward that
    recomputes another function shows as wrong gradients instead of a ``ReconstructionError``
    (the old fp32 recomputation of bf16 layers drifted by ~2e-3, over the 1e-3 default).
    """
    std, inv = make_twins(dim, num_layers, precision, seed=seed)
    inv.reconstruction_tolerance = 0.1
    x = torch.randn(rows, dim)
    z_s, ld_s, gx_s, gp_s = model_grads(std, x)
    z_i, ld_i, gx_i, gp_i = model_grads(inv, x)
    z_o, ld_o, gx_o, gp_o = oracle_grads(std, x, precision)
    forward_tol = tolerance(precision, "x")
    assert rel_err(z_s, z_o) <= forward_tol and rel_err(ld_s, ld_o) <= forward_tol
    assert rel_err(z_i, z_s) == 0 and rel_err(ld_i, ld_s) == 0  # the same kernels, same input
    return inv, (gx_s, gp_s), (gx_i, gp_i), (gx_o, gp_o)


# ----------------------------------------------------------------------------------- tests
@pytest.mark.interpreter
def test_interpreter_tf32_dots_are_fp32(monkeypatch):
    """The premise of the tf32 oracle: on this backend tf32 kernels compute what ieee ones do."""
    monkeypatch.setenv("FASTNVP_BACKEND", "triton")
    torch.manual_seed(0)
    model = FastRealNVP.standard(3, 1, HIDDEN, fused="layer")
    x = torch.randn(16, 3)
    kept, transformed, sw, tw = fl.layer_weights(model, 0)
    with torch.no_grad():
        outs = {
            p: fl.coupling_layer(x, kept, transformed, *sw, *tw, 0.01, p) for p in ("ieee", "tf32")
        }
    torch.testing.assert_close(outs["tf32"], outs["ieee"], rtol=0, atol=0)


@pytest.mark.interpreter
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("dim, num_layers, rows", [(2, 3, 24), (3, 2, 20)])
def test_invertible_gradients_match_fused_backward(
    precision, dim, num_layers, rows, monkeypatch, one_thread
):
    monkeypatch.setenv("FASTNVP_BACKEND", "triton")
    inv, standard, invertible_, oracle = fused_twins_and_grads(dim, num_layers, precision, rows)
    assert_grads_close(standard, oracle, precision)  # the oracle models the kernels' rounding
    assert_grads_close(invertible_, oracle, precision)
    assert_grads_close(invertible_, standard, precision)
    report = inv.last_reconstruction
    assert report is not None and report.ok and report.tolerance == 0.1
    assert report.layer_errors.shape == (num_layers,)
    assert report.max_layer_error < 1e-5 and report.drift_error < 1e-5


def test_bf16_rounding_is_visible_to_the_oracle(monkeypatch):
    """The bf16 oracle is far from fp32 gradients: the tolerances above can tell them apart."""
    monkeypatch.setenv("FASTNVP_BACKEND", "torch")
    std, _ = make_twins(2, 3, "bf16")
    x = torch.randn(24, 2, dtype=torch.float64)
    _, _, gx_b, gp_b = oracle_grads(std, x, "bf16")
    _, _, gx_f, gp_f = oracle_grads(std, x, "ieee")
    errors = grad_errors((gx_f, gp_f), (gx_b, gp_b))
    assert max(e for k, e in errors.items() if not k.endswith(".2.weight")) > 1e-2


def _count_steps(monkeypatch):
    """Count the layers each invertible step handles: {"shared": n, "fused": n, "generic": n}."""
    counts = {"shared": 0, "fused": 0, "generic": 0}
    for name, key in (
        ("_shared_layer_step", "shared"),
        ("_fused_layer_step", "fused"),
        ("_layer_step", "generic"),
    ):
        original = getattr(invertible, name, None)
        if original is None:
            continue

        def spy(*args, _original=original, _key=key, **kwargs):
            counts[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(invertible, name, spy)
    return counts


def test_fused_layers_take_the_fused_step(monkeypatch, one_thread):
    monkeypatch.setenv("FASTNVP_BACKEND", "torch")
    counts = _count_steps(monkeypatch)
    std, inv = make_twins(2, 3, "bf16")
    x = torch.randn(16, 2)
    _, _, gx_s, gp_s = model_grads(std, x)
    _, _, gx_i, gp_i = model_grads(inv, x)
    assert counts["shared"] == 0 and counts["fused"] == 3
    assert_grads_close((gx_i, gp_i), (gx_s, gp_s), "bf16")
    assert inv.last_reconstruction.ok


def test_unfused_model_keeps_the_shared_step(monkeypatch, one_thread):
    """fused="op": every layer takes the shared-conditioner step, gradients as before."""
    monkeypatch.setenv("FASTNVP_BACKEND", "torch")
    std, inv = make_twins(2, 3, "bf16", fused="op")  # precision only matters to fused layers
    inv.policy = Policy(gemm_stack=False)  # the generic invertible stack, not the GEMM stack
    x = torch.randn(16, 2)
    _, _, gx_s, gp_s = model_grads(std, x)
    # The path without any dispatch change: invertible_flow with the shared step forced on.
    inv.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    nll(*invertible.invertible_flow(inv, xi, share_conditioner=True)).backward()
    gx_forced, gp_forced = xi.grad, dict(_named_grads(inv))
    counts = _count_steps(monkeypatch)
    _, _, gx_i, gp_i = model_grads(inv, x)
    assert counts == {"shared": 3, "fused": 0, "generic": 0}
    assert max(grad_errors((gx_i, gp_i), (gx_forced, gp_forced)).values()) == 0.0
    assert_grads_close((gx_i, gp_i), (gx_s, gp_s), "ieee")  # fp32 math
    assert inv.last_reconstruction.ok


def _mixed_model(memory: str):
    """D = 2, three layers; layer 1's shift net is not standard, so only 0 and 2 are fused."""
    torch.manual_seed(0)
    made = {"t": 0}

    def nett():
        made["t"] += 1
        if made["t"] == 2:
            return nn.Sequential(nn.Linear(2, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 2))
        return standard_net(2, HIDDEN, tanh=False)

    model = FastRealNVP(
        lambda: standard_net(2, HIDDEN, tanh=True),
        nett,
        alternating_masks(2, 3),
        fused="layer",
        precision="bf16",
        memory=memory,
    )
    return model


def test_mixed_model_chooses_the_step_per_layer(monkeypatch, one_thread):
    monkeypatch.setenv("FASTNVP_BACKEND", "torch")
    std, inv = _mixed_model("standard"), _mixed_model("invertible")
    inv.load_state_dict(std.state_dict())
    assert [gpu_fused.model_uses_fused_layer(inv, i, torch.zeros(1, 2)) for i in range(3)] == [
        True,
        False,
        True,
    ]
    counts = _count_steps(monkeypatch)
    x = torch.randn(16, 2)
    _, _, gx_s, gp_s = model_grads(std, x)
    _, _, gx_i, gp_i = model_grads(inv, x)
    assert counts["shared"] == 1 and counts["fused"] == 2
    assert_grads_close((gx_i, gp_i), (gx_s, gp_s), "bf16")
    assert inv.last_reconstruction.ok


def test_gradcheck_float64_fused_layer_invertible(monkeypatch, one_thread):
    """gradcheck of the invertible stack over fused layers, input and every parameter."""
    monkeypatch.setenv("FASTNVP_BACKEND", "torch")
    torch.manual_seed(0)
    # The PyTorch path of the fused-layer ops takes any hidden width: a small one keeps the
    # numerical Jacobian cheap (one pair of evaluations per parameter entry).
    inv = FastRealNVP.standard(2, 2, 4, memory="invertible", fused="layer").double()
    assert all(gpu_fused.model_uses_fused_layer(inv, i, torch.zeros(1, 2)) for i in range(2))
    params = list(inv.parameters())
    x = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)

    def fn(x, *_params):  # the parameters are inputs so that gradcheck perturbs and checks them
        return invertible.invertible_flow(inv, x)

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6)
    assert inv.last_reconstruction.ok
