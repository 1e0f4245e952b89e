"""Property-based tests: the coupling ops and the flows against float64 oracles.

Hypothesis draws shapes (N = 1 included), memory layouts (contiguous, transposed views, column
and row strides), dtypes and value ranges (tiny to large log-scales, up to a soft clamp's
saturation), on the PyTorch backend and on the Triton kernels through the interpreter (small
shapes there: every program costs milliseconds). Tensor values come from a drawn seed, so a
failing example is reproducible from its printed arguments. ``derandomize=True`` keeps CI
stable: the same examples run every time.
"""

import contextlib
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fastnvp.ops  # noqa: F401 - registers torch.ops.fastnvp.*
from fastnvp import FastRealNVP, RealNVP
from fastnvp.core.conditioner import standard_net

# Output tolerance relative to the output's natural scale; log_det is always accumulated in
# fp32 (fp64) from the given s, so it gets the fp32 (fp64) tolerance whatever the I/O dtype.
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}
LD_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}
LAYOUTS = ("contiguous", "transposed", "column-strided", "row-strided")
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]


def ci_settings(max_examples: int):
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@contextlib.contextmanager
def using_backend(name: str):
    """FASTNVP_BACKEND for the duration of one example (hypothesis runs many per test)."""
    old = os.environ.get("FASTNVP_BACKEND")
    os.environ["FASTNVP_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["FASTNVP_BACKEND"]
        else:
            os.environ["FASTNVP_BACKEND"] = old


def laid_out(values: torch.Tensor, layout: str) -> torch.Tensor:
    """``values`` (N, K) as a view with the given memory layout (same values)."""
    n, k = values.shape
    if layout == "contiguous":
        return values.contiguous()
    if layout == "transposed":
        return values.t().contiguous().t()
    if layout == "column-strided":
        out = torch.full((n, 2 * k), float("nan"), dtype=values.dtype)
        out[:, ::2] = values
        return out[:, ::2]
    out = torch.full((2 * n, k), float("nan"), dtype=values.dtype)
    out[::2] = values
    return out[::2]


ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@st.composite
def coupling_case(draw, max_n: int, max_k: int, dtypes=ALL_DTYPES, more_n=(), more_k=()):
    """(a, s, t, dtype) in drawn layouts; values are rounded to ``dtype`` before the oracle.

    ``more_n``/``more_k`` add sizes beyond the small range, e.g. rows spanning several
    programs and features spanning several BLOCK_K chunks of the kernels.
    """
    dtype = draw(st.sampled_from(dtypes))
    n = draw(st.integers(1, max_n) | st.sampled_from(more_n or (1,)))
    k = draw(st.integers(1, max_k) | st.sampled_from(more_k or (1,)))
    if n > max_n and k > max_k:  # keep the interpreter's work small: one of them stays small
        k = draw(st.integers(1, max_k))
    # fp16 overflows above 65504: keep |a| * exp(|s|) well inside it.
    a_scale = draw(st.sampled_from([1e-3, 1.0] if dtype == torch.float16 else [1e-3, 1.0, 1e3]))
    s_max = draw(st.sampled_from([1e-3, 1.0, 5.0, 8.0 if dtype == torch.float16 else 10.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    layouts = [draw(st.sampled_from(LAYOUTS)) for _ in range(3)]
    gen = torch.Generator().manual_seed(seed)
    a = a_scale * torch.randn(n, k, generator=gen, dtype=torch.float64)
    s = s_max * (2 * torch.rand(n, k, generator=gen, dtype=torch.float64) - 1)
    t = torch.randn(n, k, generator=gen, dtype=torch.float64)
    a, s, t = (laid_out(v.to(dtype), lay) for v, lay in zip((a, s, t), layouts))
    return a, s, t, dtype


def oracle(a, s, t, inverse):
    a, s, t = a.double(), s.double(), t.double()
    if inverse:
        return (a - t) * torch.exp(-s), -s.sum(1), (a.abs() + t.abs()) * torch.exp(-s)
    return a * torch.exp(s) + t, s.sum(1), a.abs() * torch.exp(s) + t.abs()


def check_op(a, s, t, dtype, inverse):
    op = torch.ops.fastnvp.affine_coupling_inverse if inverse else torch.ops.fastnvp.affine_coupling
    out, log_det = op(a, s, t)
    ref, ref_ld, scale = oracle(a, s, t, inverse)
    assert out.dtype == dtype and out.shape == a.shape
    assert log_det.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(out).all() and torch.isfinite(log_det).all()
    # Below the smallest normal number the output's resolution is absolute (subnormal spacing).
    floor = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    err = ((out.double() - ref).abs() / (TOL[dtype] * scale + floor)).max().item()
    assert err <= 1, f"out: error {err:.3g} x the tolerance {TOL[dtype]} relative to scale"
    ld_scale = s.double().abs().sum(1) + 1
    ld_err = ((log_det.double() - ref_ld).abs() / ld_scale).max().item()
    assert ld_err <= LD_TOL[dtype], f"log_det: error {ld_err:.3g} > {LD_TOL[dtype]}"


# ------------------------------------------------------------------------------------- ops
@ci_settings(120)
@given(case=coupling_case(max_n=40, max_k=20, more_n=(3000,), more_k=(300,)), inverse=st.booleans())
def test_op_matches_float64_torch(case, inverse):
    with using_backend("torch"):
        check_op(*case, inverse)


@pytest.mark.interpreter
@ci_settings(80)
# 129 rows and 8 features span two programs (BLOCK_N = 128 at BLOCK_K = 8); 130 features
# span two BLOCK_K = 128 chunks of one row's loop.
@given(case=coupling_case(max_n=20, max_k=9, more_n=(129,), more_k=(130,)), inverse=st.booleans())
def test_op_matches_float64_triton(case, inverse):
    with using_backend("triton"):
        check_op(*case, inverse)


@pytest.mark.parametrize("backend_name", BACKENDS)
@ci_settings(40)
@given(
    case=coupling_case(max_n=12, max_k=6, dtypes=(torch.float32, torch.float64), more_k=(130,)),
    inverse=st.booleans(),
    seed=st.integers(0, 999),
)
def test_op_gradients_match_float64(backend_name, case, inverse, seed):
    """Backward against autograd of the float64 formula, with a strided upstream gradient."""
    a, s, t, dtype = case
    op = torch.ops.fastnvp.affine_coupling_inverse if inverse else torch.ops.fastnvp.affine_coupling
    gen = torch.Generator().manual_seed(seed)
    g_out = laid_out(torch.randn(a.shape, generator=gen, dtype=torch.float64), "transposed")
    g_ld = torch.randn(a.shape[0], generator=gen, dtype=torch.float64)
    inputs = [v.detach().clone().requires_grad_(True) for v in (a, s, t)]
    with using_backend(backend_name):
        out, log_det = op(*inputs)
        grads = torch.autograd.grad(
            (out, log_det), inputs, (g_out.to(dtype), g_ld.to(log_det.dtype))
        )
    ref_inputs = [v.detach().double().requires_grad_(True) for v in (a, s, t)]
    ref, ref_ld, _ = oracle(*ref_inputs, inverse)
    ref_grads = torch.autograd.grad((ref, ref_ld), ref_inputs, (g_out, g_ld))
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for name, got, want in zip(("a", "s", "t"), grads, ref_grads):
        err = ((got.double() - want).abs() / (want.abs() + 1)).max().item()
        assert err <= tol, f"grad of {name}: relative error {err:.3g} > {tol}"


# ----------------------------------------------------------------------------------- flows
class UserNet(nn.Module):
    """A non-standard conditioner net (so the generic path and the clamp apply)."""

    def __init__(self, dim, hidden, bias):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, dim))
        with torch.no_grad():
            self.net[2].bias.add_(bias)

    def forward(self, x):
        return self.net(x)


@st.composite
def flow_case(draw, max_dim: int, max_layers: int, max_n: int):
    dim = draw(st.integers(2, max_dim))
    layers = draw(st.integers(1, max_layers))
    masks = []
    for _ in range(layers):
        row = draw(st.lists(st.integers(0, 1), min_size=dim, max_size=dim))
        if all(row) or not any(row):  # each layer needs a kept and a transformed feature
            row[draw(st.integers(0, dim - 1))] ^= 1
        masks.append(row)
    return {
        "dim": dim,
        "masks": torch.tensor(masks, dtype=torch.float32),
        "hidden": draw(st.sampled_from([1, 3, 8])),
        "standard": draw(st.booleans()),
        # A large bias on the scale net's output drives s towards the clamp's saturation.
        "s_bias": draw(st.sampled_from([0.0, 3.0, -20.0])),
        "clamp": draw(st.sampled_from([None, 0.5, 4.0])),
        "n": draw(st.integers(1, max_n)),
        "layout": draw(st.sampled_from(LAYOUTS)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def build_pair(case):
    """A float64 reference RealNVP and the FastRealNVP copied from it."""
    torch.manual_seed(case["seed"])
    dim, hidden = case["dim"], case["hidden"]
    if case["standard"]:
        nets = lambda: standard_net(dim, hidden, tanh=True)  # noqa: E731
        nett = lambda: standard_net(dim, hidden, tanh=False)  # noqa: E731
        clamp = case["clamp"]
    else:
        nets = lambda: UserNet(dim, hidden, case["s_bias"])  # noqa: E731
        nett = lambda: UserNet(dim, hidden, 0.0)  # noqa: E731
        # An unclamped bias of -20 is a legitimate but extreme flow; keep s finite in float32.
        clamp = case["clamp"] if case["s_bias"] == 0.0 else (case["clamp"] or 4.0)
    ref = RealNVP(nets, nett, case["masks"], clamp=clamp).double()
    return ref, FastRealNVP.from_reference(ref)


def check_flow(case):
    ref, fast = build_pair(case)
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    x = torch.randn(case["n"], case["dim"], generator=gen, dtype=torch.float64)
    x = laid_out(x, case["layout"])
    with torch.no_grad():
        z_ref, ld_ref = ref.f(x)
        z64, ld64 = fast.f(x)
        x64 = fast.g(z64)
        lp64 = fast.log_prob(x)
        fast32 = FastRealNVP.from_reference(ref).float()
        z32, ld32 = fast32.f(x.float())
        x32 = fast32.g(z32)
    # float64 fast path == float64 reference.
    torch.testing.assert_close(z64, z_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ld64, ld_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lp64, ref.log_prob(x).detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x64, x, rtol=1e-9, atol=1e-9)
    # float32 fast path within fp32 rounding of the float64 oracle, relative to the scale.
    scale = 1 + z_ref.abs().max().item()
    assert (z32.double() - z_ref).abs().max().item() <= 1e-4 * scale
    assert (ld32.double() - ld_ref).abs().max().item() <= 1e-4 * (1 + ld_ref.abs().max().item())
    if case["s_bias"] == 0.0:
        # A layer with log-scale s < 0 amplifies the inverse's rounding by exp(-s): with
        # |s| of order 1 per layer the fp32 round trip stays near fp32 resolution. (Saturated
        # s = -clamp cases are ill-conditioned by construction; their float64 round trip is
        # checked above.)
        assert (x32.double() - x).abs().max().item() <= 1e-5 * scale * 3.0**fast.num_layers
    if case["clamp"] is not None and not case["standard"]:
        # Every layer's log-scale is inside [-clamp, clamp] (the ends are reached only when
        # tanh saturates in floating point): |log_det| is bounded.
        bound = fast.num_layers * (fast.dim - 1) * fast.clamp
        assert ld_ref.abs().max().item() <= bound


@ci_settings(80)
@given(case=flow_case(max_dim=6, max_layers=4, max_n=9))
def test_flow_matches_float64_reference_torch(case):
    with using_backend("torch"):
        check_flow(case)


@pytest.mark.interpreter
@ci_settings(20)
@given(case=flow_case(max_dim=4, max_layers=2, max_n=5))
def test_flow_matches_float64_reference_triton(case):
    with using_backend("triton"):
        check_flow(case)


@st.composite
def composed_case(draw):
    """A standard flow with every option the engine composes: a context (and an embedding of
    it), a norm and a mixing layer before every coupling, a memory mode, odd D."""
    context = draw(st.sampled_from([None, 1, 3]))
    return {
        "dim": draw(st.integers(2, 9)),
        "layers": draw(st.integers(1, 3)),
        "hidden": draw(st.sampled_from([3, 8, 16])),
        "context": context,
        "embedding": context is not None and draw(st.booleans()),
        "norm": draw(st.sampled_from([None, "actnorm", "batchnorm"])),
        "permutation": draw(st.sampled_from([None, "reverse", "random", "lu"])),
        "memory": draw(st.sampled_from(["standard", "invertible"])),
        "n": draw(st.integers(2, 17)),  # BatchNorm's batch statistics need two rows
        "layout": draw(st.sampled_from(LAYOUTS)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def check_composed(case):
    """FastRealNVP against its float64 reference: log_prob and every gradient in train mode
    (batch statistics; the engine's hand-written backwards), log_prob and the round trip in
    eval mode."""
    torch.manual_seed(case["seed"])
    dim, ctx = case["dim"], case["context"]
    embedding = nn.Sequential(nn.Linear(ctx, 2), nn.Tanh()) if case["embedding"] else None
    ref = RealNVP.standard(
        dim,
        case["layers"],
        case["hidden"],
        context=ctx,
        embedding=embedding,
        norm=case["norm"],
        permutation=case["permutation"],
    ).double()
    with torch.no_grad():  # away from the zero-initialised output layers and identity norms
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    x = laid_out(torch.randn(case["n"], dim, generator=gen, dtype=torch.float64), case["layout"])
    c = None if ctx is None else torch.randn(case["n"], ctx, generator=gen, dtype=torch.float64)
    given_c = {} if c is None else {"context": c}
    with torch.no_grad():
        ref.log_prob(x, **given_c)  # ActNorm's data-dependent initialisation
    fast = FastRealNVP.from_reference(ref)
    fast.memory = case["memory"]
    weights = torch.randn(case["n"], generator=gen, dtype=torch.float64)
    grads = {}
    for name, model in (("ref", ref), ("fast", fast)):
        model.train()
        xi = x.detach().clone().requires_grad_(True)
        ci = None if c is None else c.detach().clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        lp = model.log_prob(xi, **({} if ci is None else {"context": ci}))
        (lp * weights).sum().backward()
        grads[name] = {
            "log_prob": lp.detach(),
            "x": xi.grad,
            "context": None if ci is None else ci.grad,
            **{k: p.grad for k, p in model.named_parameters() if p.grad is not None},
        }
    assert grads["ref"].keys() == grads["fast"].keys()
    for key, expected in grads["ref"].items():
        got = grads["fast"][key]
        if expected is None:
            assert got is None, key
            continue
        assert torch.isfinite(got).all(), key
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-8, msg=key)
    ref.eval()
    fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            fast.log_prob(x, **given_c), ref.log_prob(x, **given_c), rtol=1e-9, atol=1e-9
        )
        z, _ = fast.f(x, **given_c)
        back = fast.g(z, **given_c)
        torch.testing.assert_close(back, x, rtol=1e-8, atol=1e-8)


@ci_settings(40)
@given(case=composed_case())
def test_composed_flow_and_gradients_match_float64_reference(case):
    with using_backend("torch"):
        check_composed(case)


# ------------------------------------------------------------- regressions found by the above
def test_regression_fp16_subnormal_output_resolution():
    """Found by test_op_matches_float64_torch: fp16 outputs below the smallest normal number
    (6.1e-5) are exact only to the subnormal spacing 6e-8, which a purely relative tolerance
    rejected. The op is right; the tolerance now has that absolute floor."""
    a = torch.tensor([[-2.3098e-03, 1e-3]], dtype=torch.float16)
    s = torch.tensor([[-8.0, -7.5]], dtype=torch.float16)
    t = torch.tensor([[1e-5, -2e-6]], dtype=torch.float16)
    for backend in ("torch", "triton"):
        with using_backend(backend):
            check_op(a, s, t, torch.float16, inverse=False)
    out, _ = torch.ops.fastnvp.affine_coupling(a, s, t)
    ref = a.double() * torch.exp(s.double()) + t.double()
    assert (out.double() - ref).abs().max().item() <= 6e-8
    assert out.abs().max().item() < torch.finfo(torch.float16).smallest_normal


def test_regression_saturated_clamp_reaches_its_bound():
    """Found by test_flow_matches_float64_reference_triton: with a scale-net output of ~-40 and
    clamp 0.5, tanh saturates to exactly -1 in float64, so |s| = clamp (not < clamp) and
    |log_det| equals the bound. The documented bound is |s| <= clamp."""
    masks = torch.tensor([[1.0, 0.0]])
    ref = RealNVP(
        lambda: UserNet(2, 1, -40.0), lambda: UserNet(2, 1, 0.0), masks, clamp=0.5
    ).double()
    with torch.no_grad():
        ref.s[0].net[2].weight.zero_()  # s = -40 exactly, whatever x
    fast = FastRealNVP.from_reference(ref)
    x = torch.randn(3, 2, dtype=torch.float64)
    for model in (ref, fast):
        _, log_det = model.f(x)
        assert torch.equal(log_det, torch.full((3,), -0.5, dtype=torch.float64))
        torch.testing.assert_close(model.g(model.f(x)[0]), x, rtol=1e-12, atol=1e-12)
