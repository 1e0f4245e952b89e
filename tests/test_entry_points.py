"""Every public entry point rejects bad shapes, dtypes, devices and values with an error that
names the argument: the flows, the ops, the data loaders, checkpoints, distributed helpers and
the training command line."""

import pytest
import torch

from fastnvp import FastRealNVP, RealNVP
from fastnvp.cli import main as cli_main
from fastnvp.training import data

MODELS = [RealNVP, FastRealNVP]
META = torch.device("meta")


@pytest.fixture(params=MODELS, ids=lambda c: c.__name__)
def flow(request):
    return request.param.standard(2, 2, hidden=4)


@pytest.mark.parametrize(
    "method,bad,exc,message",
    [
        ("f", [[1.0, 2.0]], TypeError, "x must be a torch.Tensor"),
        ("f", torch.zeros(2), ValueError, r"x must have shape \(N, 2\)"),
        ("f", torch.zeros(3, 3), ValueError, "x must have shape .*3 features"),
        ("f", torch.zeros(0, 2), ValueError, "x must have at least one row"),
        ("f", torch.zeros(3, 2, dtype=torch.long), TypeError, "x must have a floating dtype"),
        ("f", torch.zeros(3, 2, dtype=torch.float64), TypeError, "x has dtype torch.float64"),
        ("f", torch.zeros(3, 2, device=META), ValueError, "x is on meta"),
        ("g", torch.zeros(3, 5), ValueError, "z must have shape"),
        ("g", torch.zeros(3, 2, device=META), ValueError, "z is on meta"),
        ("log_prob", torch.zeros(4), ValueError, "x must have shape"),
        ("log_prob", torch.zeros(3, 2, dtype=torch.float16), TypeError, "x has dtype"),
        ("sample", 0, ValueError, "num_samples must be >= 1"),
        ("sample", 2.0, TypeError, "num_samples must be an int"),
        ("sample", True, TypeError, "num_samples must be an int"),
    ],
)
def test_flow_methods_name_the_argument(flow, method, bad, exc, message):
    with pytest.raises(exc, match=message):
        getattr(flow, method)(bad)


def test_autocast_accepts_its_dtype_and_refuses_others(flow):
    """Under CPU autocast (bf16) x may be float32 or bf16; a float64 x met a float32 weight in
    a matmul ("mat1 and mat2 must have the same dtype") instead of naming x."""
    x = torch.randn(5, 2)
    with torch.autocast("cpu", torch.bfloat16):
        assert flow.log_prob(x).shape == (5,) and flow.log_prob(x.bfloat16()).shape == (5,)
        with pytest.raises(TypeError, match="x has dtype torch.float64 but the model's"):
            flow.log_prob(x.double())


def test_sample_validates_generator(flow):
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        flow.sample(2, generator=3)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(flow.sample(3, generator=g1), flow.sample(3, generator=g2))
    with pytest.raises(ValueError, match="generator is on cpu but the model is on meta"):
        flow.to(META).sample(2, generator=g1)


@pytest.mark.parametrize("cls", MODELS)
def test_constructor_arguments(cls):
    lin = lambda: torch.nn.Linear(2, 2)  # noqa: E731
    with pytest.raises(TypeError, match="prior must be None or a distribution"):
        cls(lin, lin, [[1, 0]], prior=3)
    with pytest.raises(TypeError, match="nets must be a zero-argument callable.*not a module"):
        cls(torch.nn.Linear(2, 2), lin, [[1, 0]])
    with pytest.raises(TypeError, match=r"nett\(\) must return an nn.Module"):
        cls(lin, lambda: 3, [[1, 0]])
    with pytest.raises(ValueError, match=r"masks\[0\] transforms no feature"):
        cls(lin, lin, [[1, 1]])
    with pytest.raises(ValueError, match="masks must have shape"):
        cls(lin, lin, [1, 0])
    with pytest.raises(ValueError, match="hidden must be an int >= 1"):
        cls.standard(2, 2, hidden=0)
    with pytest.raises(ValueError, match="num_layers must be an int >= 1"):
        cls.standard(2, 0)
    for bad in ({"num_layers": True}, {"hidden": True}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be an int >= 1, got True"):
            cls.standard(**{"dim": 2, "num_layers": 2, "hidden": 4, **bad})
    for slope in ("a", float("nan"), True):
        with pytest.raises(ValueError, match="negative_slope must be a finite float"):
            cls.standard(2, 2, 4, negative_slope=slope)
    prior = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
    assert cls(lin, lin, [[1, 0]], prior=prior).log_prob(torch.zeros(3, 2)).shape == (3,)


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize("width", [1, 3])
def test_nets_of_another_output_width_are_named(cls, width):
    """A net (N, D) -> (N, width != D) broadcast against the masks (width 1) or had columns
    picked from it (the fast engine), a wrong density without an error."""
    masks = [[1.0, 0.0], [0.0, 1.0]]
    flow = cls(lambda: torch.nn.Linear(2, width), lambda: torch.nn.Linear(2, width), masks)
    for call in (flow.log_prob, flow.g):
        with pytest.raises(ValueError, match=r"nets\[\d\] and nett\[\d\] must map .* \(5, 2\)"):
            call(torch.zeros(5, 2))


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize(
    "mask, message",
    [
        ([[0.5, 0.5], [0.0, 1.0]], "only 0 and 1"),
        ([[1.0, 1.0], [0.0, 1.0]], r"masks\[0\] transforms no feature"),
        ([[0.0, 0.0], [0.0, 1.0]], r"masks\[0\] keeps no feature"),
    ],
)
def test_load_state_dict_checks_the_masks(cls, mask, message):
    """A loaded mask meets the constructor's rules: a 0.5 mask or a row keeping or
    transforming nothing loaded silently and left a flow that was not invertible."""
    flow = cls.standard(2, 2, 4)
    state = flow.state_dict()
    state["mask"] = torch.tensor(mask)
    before = flow.mask.clone()
    with pytest.raises(ValueError, match=rf"state_dict\['mask'\]: .*{message}"):
        flow.load_state_dict(state)
    assert torch.equal(flow.mask, before)


@pytest.mark.parametrize(
    "args,exc,message",
    [
        ((torch.zeros(3), torch.zeros(3), torch.zeros(3)), ValueError, r"x2 must have shape"),
        ((torch.zeros(3, 2), torch.zeros(3, 1), torch.zeros(3, 2)), ValueError, "s must have"),
        ((torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(2, 2)), ValueError, "t must have"),
        (
            (torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, 2)),
            TypeError,
            "s must have dtype torch.float32 like x2",
        ),
        ((torch.zeros(3, 0),) * 3, ValueError, "x2 must have K >= 1"),
        (
            (torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 2, device=META)),
            ValueError,
            "t must be on cpu like x2",
        ),
        ((torch.zeros(3, 2, dtype=torch.int32),) * 3, TypeError, "x2 must have a floating"),
    ],
)
def test_ops_name_the_argument(args, exc, message):
    with pytest.raises(exc, match=message):
        torch.ops.fastnvp.affine_coupling(*args)
    with pytest.raises(exc, match=message.replace("x2", "z2")):
        torch.ops.fastnvp.affine_coupling_inverse(*args)


def test_data_loaders(tmp_path):
    with pytest.raises(ValueError, match="name must be one of"):
        data.make_dataset("moon", 10)
    with pytest.raises(ValueError, match="n must be >= 1"):
        data.make_dataset("moons", 0)
    with pytest.raises(TypeError, match="seed must be an int"):
        data.two_moons(10, seed=1.5)
    with pytest.raises(ValueError, match="noise must be a finite float"):
        data.two_moons(10, noise=-1.0)
    with pytest.raises(ValueError, match="is not a file"):
        data.load_array(tmp_path / "missing.npy")
    (tmp_path / "bad.txt").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"must end in \.npy or \.csv"):
        data.load_array(tmp_path / "bad.txt")
    (tmp_path / "nan.csv").write_text("1,2\n3,nan\n4,5\n")
    with pytest.raises(ValueError, match="NaN or infinity"):
        data.load_array(tmp_path / "nan.csv")


def test_train_command_rejects_bad_options(tmp_path, capsys):
    for argv, word in [
        (["--layers", "0"], "--layers"),
        (["--batch", "-4"], "--batch"),
        (["--lr", "nan"], "--lr"),
        (["--device", "tpu"], "--device"),
        (["--dataset", "moon"], "--dataset"),
    ]:
        with pytest.raises(SystemExit) as info:
            cli_main(["train", "--out", str(tmp_path / "run"), *argv])
        assert info.value.code == 2
        assert word in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_per_layer_methods_validate():
    model = FastRealNVP.standard(2, 3, hidden=4)
    x = torch.zeros(4, 2)
    for method in (model.layer_forward, model.layer_inverse):
        with pytest.raises(ValueError, match=r"i must be a layer index in \[0, 3\), got 3"):
            method(3, x)
        with pytest.raises(ValueError, match="got -1"):
            method(-1, x)
        with pytest.raises(TypeError, match="i must be an int"):
            method(1.0, x)
        with pytest.raises(ValueError, match=r"must have shape \(N, 2\)"):
            method(0, torch.zeros(4))
        with pytest.raises(ValueError, match="is on meta"):
            method(0, torch.zeros(4, 2, device=META))
    out, log_det = model.layer_forward(2, x)
    assert out.shape == (4, 2) and log_det.shape == (4,)
