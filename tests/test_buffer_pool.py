"""The buffer pool of the CPU GEMM stack's walks (fastnvp.engine.cpu.buffer_pool,
docs/design.md §3.2): one per process, reuse only what nothing holds, never hand out an
output."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch

from fastnvp import FastRealNVP, RealNVP
from fastnvp.engine.cpu import buffer_pool
from fastnvp.engine.cpu.buffer_pool import BufferPool

F64 = torch.float64
LIKE = torch.zeros(1)


@pytest.fixture(autouse=True)
def _pool_small_buffers(monkeypatch):
    """These tests run at small shapes: the pool keeps their buffers too."""
    monkeypatch.setattr(buffer_pool, "MIN_BYTES", 0)
    buffer_pool.release()


def test_small_buffers_are_left_to_the_allocator(monkeypatch):
    monkeypatch.setattr(buffer_pool, "MIN_BYTES", 64)
    pool = BufferPool()
    pool.take((15,), LIKE)  # 60 bytes: not kept
    assert pool.nbytes == 0
    pool.take((16,), LIKE)
    assert pool.nbytes == 64


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_a_buffer_is_reused_once_nothing_holds_it():
    pool = BufferPool()
    first = pool.take((3, 4), LIKE)
    assert not first._is_view()  # an autograd node may return it, a caller write it in place
    address = first.data_ptr()
    held = pool.take((3, 4), LIKE)  # first is still held
    assert held.data_ptr() != address
    del first
    assert pool.take((3, 4), LIKE).data_ptr() == address
    assert pool.take((3, 5), LIKE).data_ptr() not in (address, held.data_ptr())
    assert pool.take((3, 4), LIKE.double()).dtype == F64


@pytest.mark.parametrize("holder", ["view", "numpy", "saved", "grad"])
def test_whatever_shares_the_memory_holds_the_buffer(holder):
    pool = BufferPool()
    buffer = pool.take((4, 5), LIKE)
    if holder == "view":
        keep = buffer[1:]
    elif holder == "numpy":
        keep = buffer.numpy()
    elif holder == "saved":
        x = torch.randn(4, 5, requires_grad=True)
        keep = x * buffer.fill_(2.0)  # autograd saves buffer for the product's backward
    else:
        keep = torch.zeros(4, 5, requires_grad=True)
        keep.grad = buffer
    address = buffer.data_ptr()
    del buffer
    for _ in range(buffer_pool.CHECKS + 1):
        assert pool.take((4, 5), LIKE).data_ptr() != address
    del keep
    assert any(pool.take((4, 5), LIKE).data_ptr() == address for _ in range(buffer_pool.CHECKS))


def test_without_the_storage_use_count_nothing_is_reused(monkeypatch):
    monkeypatch.setattr(buffer_pool, "_use_count", None)
    pool = BufferPool()
    taken = [pool.take((3,), LIKE) for _ in range(3)]
    assert all(t.shape == (3,) for t in taken)
    assert pool.nbytes == 0 and not pool.buffers()


def test_a_held_buffer_does_not_starve_the_free_ones():
    pool = BufferPool()
    held = pool.take((2,), LIKE)
    free = pool.take((2,), LIKE)
    address = free.data_ptr()
    del free
    # held is first in the queue: one check moves it back, the next finds the free one
    assert pool.take((2,), LIKE).data_ptr() == address
    assert held.data_ptr() != address


def test_a_buffer_above_a_quarter_of_the_cap_is_not_kept():
    pool = BufferPool(max_bytes=64)
    pool.take((5,), LIKE)  # 20 bytes > 64 / 4
    assert pool.nbytes == 0
    pool.take((4,), LIKE)
    assert pool.nbytes == 16


def test_the_cap_drops_free_buffers_of_other_shapes_then_stops_keeping():
    pool = BufferPool(max_bytes=200)  # and no single buffer above 50 bytes
    held = [pool.take((n,), LIKE) for n in (12, 11, 10, 9)]  # 48 + 44 + 40 + 36 bytes
    assert pool.nbytes == 168
    del held[1]  # the (11,) buffer is free now
    c = pool.take((12,), LIKE)  # (12,) is held: 48 more passes 200, so the free (11,) goes
    assert pool.nbytes == 172
    d = pool.take((12,), LIKE)  # nothing free to drop: allocated, not kept
    assert pool.nbytes == 172 and not any(_same_memory(d, f) for f in pool.buffers(free_only=True))
    assert c.shape == (12,) and len(held) == 3
    pool.clear()
    assert pool.nbytes == 0


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
    return ref, fast, x, c


def _poison(flow) -> None:
    """What a reuse of the pool's free buffers might leave in them."""
    for buffer in buffer_pool.shared().buffers(free_only=True):
        buffer.fill_(float("nan"))


@pytest.mark.parametrize("case", list(CASES))
def test_calls_without_a_gradient_match_the_reference_and_keep_their_outputs(case):
    """Every call reads only what it wrote (free buffers are poisoned between calls), and the
    outputs of earlier calls stay as they were."""
    ref, fast, x, c = _pair(**CASES[case])
    ref.eval()
    fast.eval()
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
    assert buffer_pool.shared().nbytes > 0


def _gradients(flow, x, c):
    loss = -flow.log_prob(x, c).mean()
    return torch.autograd.grad(loss, list(flow.parameters()))


@pytest.mark.parametrize("memory", ["standard", "invertible"])
@pytest.mark.parametrize(
    "case", ["checkerboard", "odd-dim", "context", "batchnorm-lu", "actnorm-random"]
)
def test_training_steps_match_the_reference_from_a_poisoned_pool(case, memory):
    ref, fast, x, c = _pair(**CASES[case])
    fast.memory = memory
    want = _gradients(ref, x, c)
    for _ in range(3):
        for a, b in zip(_gradients(fast, x, c), want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
        _poison(fast)


def test_graphs_alive_together_keep_their_buffers():
    """Two forwards before their backward, and a graph kept for a second backward while
    other steps run: each graph's saved buffers stay its own."""
    ref, fast, x, _ = _pair(dim=6)
    y = torch.randn(20, 6, dtype=F64)
    params = list(fast.parameters())
    want_x = torch.autograd.grad(ref.log_prob(x).sum(), list(ref.parameters()))
    want_y = torch.autograd.grad(ref.log_prob(y).sum(), list(ref.parameters()))
    both = fast.log_prob(x).sum() + fast.log_prob(y).sum()
    for got, a, b in zip(torch.autograd.grad(both, params), want_x, want_y, strict=True):
        torch.testing.assert_close(got, a + b, atol=1e-9, rtol=1e-9)
    kept = fast.log_prob(x).sum()
    first = torch.autograd.grad(kept, params, retain_graph=True)
    _poison(fast)
    for _ in range(2):  # other steps in between, on rows of the same shape
        torch.autograd.grad(fast.log_prob(x * 0.5).sum(), params)
        _poison(fast)
    second = torch.autograd.grad(kept, params)
    for a, b, w in zip(first, second, want_x, strict=True):
        torch.testing.assert_close(a, w, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(b, w, atol=1e-9, rtol=1e-9)


def test_outputs_of_the_autograd_walk_are_plain_tensors():
    _, fast, x, _ = _pair(dim=6, permutation="reverse")  # a walk in feature order
    z, log_det = fast.f(x)
    assert z.requires_grad and log_det.requires_grad
    z.mul_(2.0)  # allowed (no backward through z after it): not a view made inside the node
    pooled = buffer_pool.shared().buffers()
    assert not any(_same_memory(t, b) for t in (z, log_det) for b in pooled)


def test_copies_share_the_pool_and_release_empties_it():
    _, fast, x, _ = _pair(dim=6)
    with torch.no_grad():
        fast.log_prob(x)
        for other in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
            torch.testing.assert_close(other.log_prob(x), fast.log_prob(x))
    assert buffer_pool.shared().nbytes > 0
    fast.release_buffers()
    assert buffer_pool.shared().nbytes == 0


def test_concurrent_calls_on_one_flow_agree(one_thread):
    _, fast, x, _ = _pair(dim=6)
    with torch.no_grad():
        want = fast.log_prob(x)
    errors: list[BaseException] = []

    def work():
        try:
            for _ in range(20):
                with torch.no_grad():
                    torch.testing.assert_close(fast.log_prob(x), want, atol=0, rtol=0)
                torch.autograd.grad(fast.log_prob(x).sum(), list(fast.parameters()))
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]


def test_gradients_a_caller_keeps_survive_later_steps():
    """Parameter gradients come from the pool: a kept ``.grad`` holds its buffer, and
    gradients accumulated over steps (``zero_grad(set_to_none=False)``) add up."""
    ref, fast, x, _ = _pair(dim=6)
    (-fast.log_prob(x).mean()).backward()
    kept = [p.grad for p in fast.parameters()]
    want = [g.clone() for g in kept]
    fast.zero_grad(set_to_none=True)
    for _ in range(2):
        (-fast.log_prob(x * 0.5).mean()).backward()
        fast.zero_grad(set_to_none=True)
        _poison(fast)
    for got, expected in zip(kept, want, strict=True):
        assert torch.equal(got, expected)
    for _ in range(2):
        (-fast.log_prob(x).mean()).backward()
        _poison(fast)
    (-ref.log_prob(x).mean()).backward()
    mine = dict(fast.named_parameters())
    for name, expected in ref.named_parameters():
        torch.testing.assert_close(mine[name].grad, 2 * expected.grad, atol=1e-9, rtol=1e-9)


def test_buffer_pool_ab_benchmark_writes_its_table(one_thread, run_ab_benchmark):
    """benchmarks/buffer_pool_ab.py on one tiny shape (``run_ab_benchmark``), with fault counts
    in every row and the pool's cap restored after."""
    cap = buffer_pool.POOL_MAX_BYTES
    _, rows, table = run_ab_benchmark("buffer_pool_ab", (4, 8, 16, 2), ("fresh_ms", "pooled_ms"))
    assert buffer_pool.POOL_MAX_BYTES == cap
    for row in rows:
        assert row["fresh_faults"] >= 0 and row["pooled_faults"] >= 0
    assert "| 4 | 8 | 16 | 2 | train |" in table
    assert "Speed-up over the 3 cells:" in table
