"""The parameter bank: the conditioner weights as views of one tensor per kind.

docs/design.md §3.2, ``fastnvp.engine.param_bank``. The bank must be invisible: the same
parameters (names, count, state_dict keys), the same results and gradients as without it and
as the float64 reference, and it must stay correct whenever something rebinds the parameters.
"""

import copy
import pickle

import pytest
import torch

from fastnvp import FastRealNVP, RealNVP
from fastnvp.core.conditioner import standard_net
from fastnvp.core.masks import alternating_masks
from fastnvp.engine.cpu.gemm_stack import bank_of, layer_parameters


def _twins(context=None, num_layers=4, dim=6, hidden=8):
    torch.manual_seed(5)
    ref = RealNVP.standard(dim, num_layers, hidden, context=context).double()
    return ref, FastRealNVP.from_reference(ref)


def _inputs(model, rows=9):
    x = torch.randn(rows, model.dim, dtype=torch.float64)
    width = model.context_features
    given = {} if width is None else {"context": torch.randn(rows, width, dtype=torch.float64)}
    return x, given


def _holds(model) -> bool:
    return bank_of(model, layer_parameters(model)) is not None


def _grads(model, x, given):
    model.zero_grad(set_to_none=True)
    model.log_prob(x, **given).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("context", [None, 3])
def test_parameters_are_views_of_one_tensor_per_kind(context):
    ref, fast = _twins(context)
    bank = fast._param_bank
    assert bank is not None and _holds(fast)
    assert [name for name, _ in fast.named_parameters()] == [
        name for name, _ in ref.named_parameters()
    ]
    assert list(fast.state_dict()) == list(ref.state_dict())
    params = layer_parameters(fast)
    for k, param in enumerate(params):
        layer, slot = divmod(k, 12)
        net, kind = divmod(slot, 6)
        view = bank.kinds[kind][layer, net]
        assert param.data_ptr() == view.data_ptr() and param.shape == view.shape
        assert param.is_leaf and param.requires_grad
    for kind in bank.kinds:
        assert kind.shape[:2] == (fast.num_layers, 2) and kind.is_contiguous()


@pytest.mark.parametrize("context", [None, 3])
def test_bank_changes_no_result_or_gradient(context, one_thread):
    """log_prob, f, g and every parameter's gradient: with the bank, without it (the per-call
    stacks) and in the float64 reference agree, and no gradient is NaN."""
    ref, fast = _twins(context)
    x, given = _inputs(fast)
    with_bank = _grads(fast, x, given)
    lp_bank = fast.log_prob(x, **given).detach()
    bank = fast._param_bank
    fast._param_bank = None
    fast.clear_caches()
    without = _grads(fast, x, given)
    lp_without = fast.log_prob(x, **given).detach()
    fast._param_bank = bank
    expected = _grads(ref, x, given)
    torch.testing.assert_close(lp_bank, lp_without, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(lp_bank, ref.log_prob(x, **given).detach())
    for name, grad in with_bank.items():
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad, without[name], rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(grad, expected[name], rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        z, _ = fast.f(x, **given)
        torch.testing.assert_close(fast.g(z, **given), x)


@pytest.mark.parametrize("context, dim", [(None, 6), (3, 6), (None, 5)])
def test_training_pack_is_kept_and_refilled_after_every_step(context, dim, one_thread):
    """A call with a gradient reuses the previous call's pack of views on the bank and only
    refills its gathered copies: gradients still follow every update of the weights."""
    torch.manual_seed(5)
    ref = RealNVP.standard(dim, 4, 8, context=context).double()
    fast = FastRealNVP.from_reference(ref)
    x, given = _inputs(fast)
    packs = []
    for _ in range(3):
        want, got = _grads(ref, x, given), _grads(fast, x, given)
        for name, g in want.items():
            torch.testing.assert_close(got[name], g, atol=1e-12, rtol=1e-12, msg=name)
        packs.append(fast._gemm_grad_pack[-1])
        with torch.no_grad():
            for model in (ref, fast):
                for p in model.parameters():
                    p.sub_(0.05 * p.grad)
    assert packs[0] is packs[1] is packs[2]


def test_optimizer_steps_update_the_bank_in_place(one_thread):
    """Adam writes each parameter in place, i.e. into the bank: the bank keeps holding them,
    and the next call (cached no-grad pack included) computes with the new values."""
    ref, fast = _twins()
    x, given = _inputs(fast)
    ref.load_state_dict(fast.state_dict())
    with torch.no_grad():
        fast.log_prob(x, **given)  # fills the cached no-grad pack before the steps
    for model in (ref, fast):
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        for _ in range(3):
            opt.zero_grad()
            (-model.log_prob(x, **given).mean()).backward()
            opt.step()
    assert _holds(fast)
    with torch.no_grad():
        torch.testing.assert_close(fast.log_prob(x, **given), ref.log_prob(x, **given))


@pytest.mark.parametrize(
    "rebind",
    ["deepcopy", "pickle", "to_float", "assign_load", "from_reference"],
)
def test_bank_survives_what_rebinds_parameters(rebind, one_thread):
    ref, fast = _twins(3)
    if rebind == "deepcopy":
        model = copy.deepcopy(fast)
    elif rebind == "pickle":
        model = pickle.loads(pickle.dumps(fast))
    elif rebind == "to_float":
        model, ref = fast.float(), ref.float()
    elif rebind == "assign_load":
        state = {name: value.clone() for name, value in ref.state_dict().items()}
        model = fast
        model.load_state_dict(state, assign=True)
    else:
        model = FastRealNVP.from_reference(ref)
    assert _holds(model), rebind
    x, given = _inputs(model)
    dtype = next(model.parameters()).dtype
    x, given = x.to(dtype), {k: v.to(dtype) for k, v in given.items()}
    with torch.no_grad():
        torch.testing.assert_close(model.log_prob(x, **given), ref.log_prob(x, **given))
    if rebind in ("deepcopy", "pickle"):  # the copy owns its own storage
        assert model._param_bank.kinds[2].data_ptr() != fast._param_bank.kinds[2].data_ptr()


def test_stand_in_parameters_are_used_not_the_bank(one_thread):
    """torch.func.functional_call swaps in other tensors for one call: they are not the bank's
    views, so the engine stacks them per call and computes with them."""
    ref, fast = _twins()
    x, given = _inputs(fast)
    other = {name: p.detach() * 1.1 for name, p in fast.named_parameters()}
    got = torch.func.functional_call(fast, other, (x,), given, strict=False)
    ref.load_state_dict({**ref.state_dict(), **other})
    with torch.no_grad():
        torch.testing.assert_close(got, ref(x, **given))


def test_pickles_are_compact_and_copies_build_their_own_bank(one_thread):
    """Each parameter has a storage of exactly its bytes, so a plain pickle (which writes a
    view's whole storage) is as small as the parameters, also after a functional_call.
    Deep copies and pickles carry no bank and build their own; a shallow copy has the same
    parameters and shares the original's."""
    _, fast = _twins(3, num_layers=6, hidden=32)
    x, given = _inputs(fast)
    payload = sum(p.numel() * p.element_size() for p in fast.parameters())
    for param in layer_parameters(fast):
        assert param.untyped_storage().nbytes() == param.numel() * param.element_size()
    assert len(pickle.dumps(fast)) < 1.2 * payload + 100_000
    original = fast._param_bank.kinds[2].data_ptr()
    for copied in (pickle.loads(pickle.dumps(fast)), copy.deepcopy(fast)):
        assert _holds(copied) and copied._param_bank.kinds[2].data_ptr() != original
        with torch.no_grad():
            torch.testing.assert_close(copied.log_prob(x, **given), fast.log_prob(x, **given))
    shallow = copy.copy(fast)
    assert shallow._param_bank is fast._param_bank and _holds(shallow)
    assert _holds(fast) and fast._param_bank.kinds[2].data_ptr() == original
    other = {name: p.detach().clone() for name, p in fast.named_parameters()}
    torch.func.functional_call(fast, other, (x,), given)  # stand-ins for one call
    assert _holds(fast) and fast._param_bank.kinds[2].data_ptr() == original  # serves again
    assert len(pickle.dumps(fast)) < 1.2 * payload + 100_000


def test_deep_copies_keep_identities_and_old_pickles_load(one_thread):
    """A deep copy of (flow, optimizer) keeps the optimizer on the copy's parameters; a
    forward hook that refers to the flow copies; a flow pickled without a bank (before it
    existed) loads and builds one."""
    _, fast = _twins()
    x, given = _inputs(fast)
    opt = torch.optim.Adam(fast.parameters())
    fast.s[0].register_forward_hook(lambda module, args, out, flow=fast: None)
    flow2, opt2 = copy.deepcopy((fast, opt))
    ids = {id(p) for p in flow2.parameters()}
    assert all(id(p) in ids for group in opt2.param_groups for p in group["params"])
    assert _holds(flow2)
    state = fast.__getstate__()
    del state["_param_bank"]
    old = FastRealNVP.__new__(FastRealNVP)
    old.__setstate__(copy.deepcopy(state))
    assert _holds(old)
    with torch.no_grad():
        torch.testing.assert_close(old.log_prob(x, **given), fast.log_prob(x, **given))


def test_shared_memory_keeps_parameters_where_they_are(one_thread):
    """share_memory() moves each parameter into shared memory on its own: the bank is stale
    and no new one is built (other processes hold those parameters); results are unchanged."""
    ref, fast = _twins()
    x, given = _inputs(fast)
    fast.share_memory()
    assert all(p.is_shared() for p in fast.parameters())
    assert fast._param_bank is None
    with torch.no_grad():
        torch.testing.assert_close(fast.log_prob(x, **given), ref.log_prob(x, **given))


def _train_in_child(model):
    torch.set_num_threads(1)
    x = torch.randn(16, model.dim)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    (-model.log_prob(x).mean()).backward()
    opt.step()


@pytest.mark.parametrize("shared", [True, False])
def test_spawned_process_trains_the_parents_parameters(shared):
    """Hogwild: a flow sent to a spawned process (after share_memory(), or moved there by
    torch's own pickler) is the same storage there, so the child's step changes the
    parent's parameters; the parent keeps computing correctly."""
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    fast = FastRealNVP.standard(4, 2, 8)
    if shared:
        fast.share_memory()
    before = [p.detach().clone() for p in fast.parameters()]
    child = mp.get_context("spawn").Process(target=_train_in_child, args=(fast,))
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0
    changed = [not torch.equal(a, p) for a, p in zip(before, fast.parameters(), strict=True)]
    assert all(changed)
    x = torch.randn(5, 4)
    with torch.no_grad():
        expected = _reference_of(fast).log_prob(x)
        torch.testing.assert_close(fast.log_prob(x), expected)


def _reference_of(fast):
    """A RealNVP with ``fast``'s parameters (copied), as the oracle."""
    ref = RealNVP.standard(fast.dim, fast.num_layers, fast.s[0][0].out_features)
    ref.load_state_dict(fast.state_dict())
    return ref


def test_rebinding_from_outside_stacks_per_call_until_the_next_rebuild(one_thread):
    """vector_to_parameters re-points every parameter into one vector: the bank no longer holds
    them, the calls stack the new parameters and compute with them, and the next .to() builds
    a new bank over them."""
    ref, fast = _twins()
    x, given = _inputs(fast)
    vector = torch.nn.utils.parameters_to_vector(fast.parameters()) * 0.9
    torch.nn.utils.vector_to_parameters(vector, fast.parameters())
    torch.nn.utils.vector_to_parameters(vector.clone(), ref.parameters())
    fast.clear_caches()
    with torch.no_grad():
        torch.testing.assert_close(fast.log_prob(x, **given), ref.log_prob(x, **given))
    assert fast._param_bank is not None and not _holds(fast)
    fast.to(torch.float64)
    assert _holds(fast)
    with torch.no_grad():
        torch.testing.assert_close(fast.log_prob(x, **given), ref.log_prob(x, **given))


def test_no_bank_where_the_gemm_stack_does_not_run():
    """Shared nets or non-standard conditioners: no bank, parameters untouched."""
    dim = 4
    masks = alternating_masks(dim, 4)
    shared = standard_net(dim, 8, tanh=True)
    tied = FastRealNVP(lambda: shared, lambda: standard_net(dim, 8, tanh=False), masks)
    assert tied._param_bank is None

    def custom():
        return torch.nn.Sequential(
            torch.nn.Linear(dim, 8), torch.nn.ReLU(), torch.nn.Linear(8, dim)
        )

    plain = FastRealNVP(custom, custom, masks)
    assert plain._param_bank is None
    assert all(p._base is None for p in plain.parameters())


def test_no_bank_off_the_cpu():
    """Only CPU parameters are banked (module limit): the GPU paths gain nothing from it, and
    back-to-back packing would misalign some of them. Checked with meta tensors here."""
    from fastnvp.engine import param_bank

    _, fast = _twins()
    params = [p.detach().to("meta") for p in layer_parameters(fast)]
    assert param_bank.build(params) is None
    assert all(p.device.type == "meta" for p in params)


def test_bank_ab_benchmark_writes_its_table(one_thread, run_ab_benchmark):
    """benchmarks/param_bank_ab.py on one tiny shape (``run_ab_benchmark``)."""
    _, _, table = run_ab_benchmark(
        "param_bank_ab", (4, 2, 8, 16, 2), ("with_bank_ms", "without_bank_ms")
    )
    assert "| 4 | 2 | 8 | 16 | 2 | train |" in table


def test_paired_rounds_alternate_and_report_off_over_on():
    """fastnvp.bench.paired: the first setting of each round alternates, calls are sized from
    a probe of the on setting, and the speed-up is off / on per round."""
    from fastnvp.bench.paired import paired_rounds

    seen = []

    def timed(on: bool, calls: int) -> float:
        seen.append((on, calls))
        return 2.0 if on else 3.0

    result = paired_rounds(timed, rounds=4, seconds=0.1)
    assert seen[0] == (True, 2)  # the probe
    assert [on for on, _ in seen[1:]] == [True, False, False, True, True, False, False, True]
    assert {calls for _, calls in seen[1:]} == {50}  # 0.1 s / 2 ms
    assert result["on_ms"] == 2.0 and result["off_ms"] == 3.0
    assert result["speedup"] == result["q1"] == result["q3"] == 1.5
    assert result["calls_per_round"] == 50
