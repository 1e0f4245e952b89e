"""The workspace that the CPU GEMM stack's calls without a gradient reuse between calls
(fastnvp.engine.cpu.workspace, docs/design.md §3.2)."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch

from fastnvp import FastRealNVP, RealNVP
from fastnvp.engine.cpu import workspace
from fastnvp.engine.cpu.workspace import Workspace, borrowed

F64 = torch.float64


def test_buffers_are_reused_while_shape_dtype_and_device_match():
    ws = Workspace()
    like = torch.zeros(1)
    first = ws.buffer("a", (3, 4), like)
    assert ws.buffer("a", (3, 4), like) is first
    assert ws.holds(first) and not ws.holds(first.clone())
    assert ws.buffer("a", (3, 5), like) is not first
    assert ws.buffer("a", (3, 5), like.double()).dtype == F64
    assert ws.nbytes == 3 * 5 * 8
    ws.clear()
    assert ws.nbytes == 0


def test_one_call_holds_the_kept_workspace_at_a_time(monkeypatch):
    class Owner:
        pass

    owner = Owner()
    with borrowed(owner) as outer:
        outer.buffer("a", (4,), torch.zeros(1))
        with borrowed(owner) as inner:  # nested (or another thread): a throwaway one
            assert inner is not outer
    with borrowed(owner) as again:
        assert again is outer and again.nbytes == 16
    monkeypatch.setattr(workspace, "WORKSPACE_MAX_BYTES", 8)
    with borrowed(owner) as capped:
        capped.buffer("b", (4,), torch.zeros(1))
    assert capped.nbytes == 0  # above the cap the buffers go with the call


CASES = {
    "checkerboard": dict(dim=6),
    "odd-dim": dict(dim=5),
    "context": dict(dim=4, context=3),
    "actnorm-random": dict(dim=6, norm="actnorm", permutation="random"),
    "batchnorm-lu": dict(dim=6, norm="batchnorm", permutation="lu"),
    "reverse": dict(dim=6, permutation="reverse"),
    "single-input": dict(dim=2),
}


def _pair(dim, context=None, **options):
    torch.manual_seed(0)
    ref = RealNVP.standard(dim, 4, 10, context=context, **options).double()
    fast = FastRealNVP.standard(dim, 4, 10, context=context, **options).double()
    x = torch.randn(33, dim, dtype=F64) * 2
    c = None if context is None else torch.randn(33, context, dtype=F64)
    ref.log_prob(x, c)  # ActNorm's data-dependent initialization
    fast.load_state_dict(ref.state_dict())
    return ref.eval(), fast.eval(), x, c


def _poison(flow) -> None:
    for buffer in flow.__dict__[workspace.ATTRIBUTE]._buffers.values():
        buffer.fill_(float("nan"))


@pytest.mark.parametrize("case", list(CASES))
def test_repeated_calls_match_the_reference_and_never_share_outputs(case):
    """Every call reads only what it wrote: the buffers are poisoned between calls, and the
    outputs of earlier calls stay as they were."""
    ref, fast, x, c = _pair(**CASES[case])
    z = torch.randn(33, x.shape[1], dtype=F64)
    with torch.no_grad():
        want_f, want_g = ref.f(x, c), ref.g(z, c)
        want_inverse = ref.inverse(z, c)
        kept = []
        for _ in range(4):  # the pack's second call switches to its inference operands
            got = (fast.f(x, c), fast.g(z, c), fast.inverse(z, c), fast.log_prob(x, c))
            kept.append(got)
            _poison(fast)
        for got_f, got_g, got_inverse, got_lp in kept:
            for a, b in zip(got_f, want_f, strict=True):
                torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
            torch.testing.assert_close(got_g, want_g, atol=1e-10, rtol=1e-10)
            for a, b in zip(got_inverse, want_inverse, strict=True):
                torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
            torch.testing.assert_close(got_lp, ref.log_prob(x, c), atol=1e-10, rtol=1e-10)
    assert fast.explain(x, context=c).stack == "cpu_gemm_stack"


def test_batchnorm_in_train_mode_without_a_gradient():
    ref, fast, x, _ = _pair(dim=6, norm="batchnorm")
    ref.train()
    fast.train()
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(fast.log_prob(x), ref.log_prob(x))
            _poison(fast)
    for name, buffer in ref.named_buffers():
        torch.testing.assert_close(dict(fast.named_buffers())[name], buffer, msg=name)


def test_clear_caches_copies_and_pickles_drop_the_workspace():
    _, fast, x, _ = _pair(dim=6)
    with torch.no_grad():
        fast.log_prob(x)
    assert workspace.ATTRIBUTE in fast.__dict__
    for other in (copy.deepcopy(fast), copy.copy(fast), pickle.loads(pickle.dumps(fast))):
        assert workspace.ATTRIBUTE not in other.__dict__
        with torch.no_grad():
            torch.testing.assert_close(other.log_prob(x), fast.log_prob(x))
    fast.clear_caches()
    assert workspace.ATTRIBUTE not in fast.__dict__


def test_concurrent_calls_on_one_flow_agree(one_thread):
    _, fast, x, _ = _pair(dim=6)
    with torch.no_grad():
        want = fast.log_prob(x)
    errors: list[BaseException] = []

    def work():
        try:
            with torch.no_grad():
                for _ in range(30):
                    torch.testing.assert_close(fast.log_prob(x), want, atol=0, rtol=0)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
