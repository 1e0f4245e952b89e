"""Figure of the knot form (fastnvp.engine.cpu.knots): one conditioner net as a piecewise-linear
function.

Left: the shift net T of a random D = 2 standard conditioner (H = 24, so the pieces are
visible) evaluated by the module on a dense grid and by the piece table, with the first
layer's knots (grey) and the second layer's zero crossings (red) marked; the panel title
gives the largest difference. Right: the number of pieces of one net against H at random
initialisation, next to the first layer's H knots.

    python benchmarks/knots_figure.py [--out docs/knots/pieces.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from matplotlib.figure import Figure

from fastnvp.core.conditioner import match_standard_mlp, standard_net
from fastnvp.engine.cpu import knots

KEPT, TRANSFORMED = torch.tensor([0]), torch.tensor([1])


def _pair(hidden: int, seed: int):
    torch.manual_seed(seed)
    nets = [standard_net(2, hidden, tanh=tanh).double() for tanh in (True, False)]
    return nets, [match_standard_mlp(net, 2) for net in nets]


def _t_pieces(mlp) -> int:
    """Pieces of the shift net alone: its first-layer knots and second-layer crossings."""
    net_knots, _, _ = knots._net_pieces(mlp, KEPT, TRANSFORMED)
    return net_knots.numel() + 1


def make(out: Path) -> Path:
    nets, mlps = _pair(24, 0)
    table = knots.build_pieces(*mlps, KEPT, TRANSFORMED)
    w1 = nets[1][0].weight[:, 0].detach()
    b1 = nets[1][0].bias.detach()
    first = (-b1 / w1).sort().values
    net_knots = knots._net_pieces(mlps[1], KEPT, TRANSFORMED)[0]
    crossings = net_knots[~torch.isin(net_knots, first)]
    lo, hi = float(first.quantile(0.1)) - 1.0, float(first.quantile(0.9)) + 1.0
    x = torch.linspace(lo, hi, 4001, dtype=torch.float64).unsqueeze(1)
    with torch.no_grad():
        module_t = nets[1](torch.cat((x, torch.zeros_like(x)), 1))[:, 1]
    _, piece_t = knots.evaluate_pieces(table, x)
    error = (piece_t[:, 0] - module_t).abs().max().item()

    fig = Figure(figsize=(11, 4.2))
    left, right = fig.subplots(1, 2)
    left.plot(x[:, 0], module_t, color="#1f77b4", lw=2.5, label="module (GEMM form)")
    left.plot(x[:, 0], piece_t[:, 0], color="black", lw=0.8, ls="--", label="piece table")
    for k in first[(first > lo) & (first < hi)]:
        left.axvline(float(k), color="0.8", lw=0.6, zorder=0)
    inside = crossings[(crossings > lo) & (crossings < hi)].unsqueeze(1)
    with torch.no_grad():
        at_crossings = nets[1](torch.cat((inside, torch.zeros_like(inside)), 1))[:, 1]
    left.plot(inside[:, 0], at_crossings, "|", color="#d62728", ms=14, mew=1.5)
    left.set(
        xlabel="kept feature x (grey: first-layer knots, red: second-layer crossings)",
        ylabel="T(x) (transformed output)",
        title=f"H = 24 shift net: max |difference| = {error:.1e}",
    )
    left.legend(loc="best", fontsize=8)

    widths = [16, 32, 64, 128, 256, 512, 1024]
    pieces = [_t_pieces(_pair(h, 1)[1][1]) for h in widths]
    right.plot(widths, pieces, "o-", label="pieces of one net (random init)")
    right.plot(widths, [h + 1 for h in widths], "--", color="0.5", label="first layer: H + 1")
    right.set(xscale="log", yscale="log", xlabel="hidden width H", ylabel="pieces")
    right.set_title("pieces of one net vs hidden width")
    right.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/knots/pieces.png"))
    print(make(parser.parse_args(argv).out))


if __name__ == "__main__":
    main()
