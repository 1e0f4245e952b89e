"""FastRealNVP: a drop-in replacement for :class:`fastnvp.reference.RealNVP`.

Same constructor, methods, return shapes and ``state_dict`` keys as the reference; the same
function (DESIGN §1). What differs is how it is computed:

- each layer works on the split halves ``x1 = x[:, kept]``, ``x2 = x[:, transformed]``; no
  multiply-by-mask on full-width tensors and no discarded conditioner outputs;
- a standard conditioner (detected by module types and shapes) runs on the halves directly:
  its first Linear sees only the kept columns and its last Linear produces only the
  transformed rows;
- the coupling update and log_det are the fused custom op ``fastnvp::affine_coupling``;
- the standard-normal prior is computed in closed form.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from fastnvp import ops
from fastnvp.conditioner import is_standard_pair, match_standard_mlp, standard_net
from fastnvp.masks import alternating_masks
from fastnvp.reference import FlowBase, RealNVP


class FastRealNVP(FlowBase):
    """Real NVP with fused coupling kernels; a drop-in for :class:`fastnvp.RealNVP`.

    Args:
        nets: zero-argument factory returning the scale net S: (N, D) -> (N, D).
        nett: zero-argument factory returning the shift net T: (N, D) -> (N, D).
        masks: (L, D) 0/1 tensor, 1 = kept (conditioning) feature; one row per coupling layer.
        prior: a ``torch.distributions`` object over (N, D), or None for N(0, I) (closed form).

    ``f(x) -> (z, log_det)``, ``g(z) -> x``, ``log_prob(x) -> (N,)``, ``sample(n) -> (n, D)``.
    """

    def __init__(self, nets, nett, masks, prior=None):
        super().__init__(nets, nett, masks, prior)
        self.register_buffer("split_order", torch.empty(0, dtype=torch.long), persistent=False)
        self._refresh_split()
        # Loading a state_dict may bring other masks: rebuild the split each time.
        self.register_load_state_dict_post_hook(
            lambda module, _incompatible: module._refresh_split()
        )

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def standard(cls, dim: int, num_layers: int, hidden: int = 256, negative_slope: float = 0.01):
        """The standard conditioner (DESIGN §1) with alternating checkerboard masks."""
        masks = alternating_masks(dim, num_layers)
        return cls(
            lambda: standard_net(dim, hidden, tanh=True, negative_slope=negative_slope),
            lambda: standard_net(dim, hidden, tanh=False, negative_slope=negative_slope),
            masks,
        )

    @classmethod
    def from_reference(cls, model: RealNVP) -> FastRealNVP:
        """A FastRealNVP computing the same function as ``model`` (deep copies of its nets)."""
        if not isinstance(model, FlowBase):
            raise TypeError(f"model must be a RealNVP, got {type(model).__name__}")
        s_nets = iter(copy.deepcopy(list(model.s)))
        t_nets = iter(copy.deepcopy(list(model.t)))
        fast = cls(
            lambda: next(s_nets), lambda: next(t_nets), model.mask.detach().cpu(), model.prior
        )
        anchor = model._anchor()
        return fast.to(device=anchor.device)

    def _refresh_split(self) -> None:
        """Per layer: kept indices then transformed ones, and how many are kept."""
        mask = self.mask.detach()
        order = torch.argsort(1 - mask, dim=1, stable=True)  # kept (1) first, each in order
        self.split_order = order.to(device=mask.device)
        self._num_kept = [int(k) for k in mask.sum(dim=1).round().tolist()]
        self._standard = [
            is_standard_pair(self.s[i], self.t[i], self.dim) for i in range(self.num_layers)
        ]

    def _split(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        order = self.split_order[i]
        k1 = self._num_kept[i]
        return order[:k1], order[k1:]

    # ----------------------------------------------------------------------------- conditioner
    def _conditioner(self, i: int, h: torch.Tensor, x1: torch.Tensor, kept, transformed):
        """(s, t) of layer i for the transformed half, each (N, K2); x1 (N, K1) is the kept half."""
        if self._standard[i]:
            return self._standard_st(i, x1, kept, transformed)
        masked = h * self.mask[i].to(h.dtype)
        s = self.s[i](masked).index_select(1, transformed)
        t = self.t[i](masked).index_select(1, transformed)
        return s, t

    def _standard_st(self, i: int, x1, kept, transformed):
        s_mlp = match_standard_mlp(self.s[i], self.dim)
        t_mlp = match_standard_mlp(self.t[i], self.dim)
        slope = s_mlp.negative_slope
        outs = []
        for mlp in (s_mlp, t_mlp):
            h = F.linear(x1, mlp.lin1.weight.index_select(1, kept), mlp.lin1.bias)
            h = F.leaky_relu(h, slope)
            h = F.leaky_relu(F.linear(h, mlp.lin2.weight, mlp.lin2.bias), slope)
            outs.append(
                F.linear(
                    h,
                    mlp.lin3.weight.index_select(0, transformed),
                    mlp.lin3.bias.index_select(0, transformed),
                )
            )
        return torch.tanh(outs[0]), outs[1]

    # ----------------------------------------------------------------------------- one layer
    def layer_forward(self, i: int, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Coupling layer ``i`` in the data -> latent direction.  (N, D) -> ((N, D), (N,))."""
        kept, transformed = self._split(i)
        x1 = z.index_select(1, kept)
        s, t = self._conditioner(i, z, x1, kept, transformed)
        z2, log_det = ops.affine_coupling(
            z.index_select(1, transformed), s.to(z.dtype), t.to(z.dtype)
        )
        return z.index_copy(1, transformed, z2), log_det

    def layer_inverse(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Coupling layer ``i`` in the latent -> data direction.  (N, D) -> ((N, D), (N,))."""
        kept, transformed = self._split(i)
        x1 = x.index_select(1, kept)
        s, t = self._conditioner(i, x, x1, kept, transformed)
        x2, log_det = ops.affine_coupling_inverse(
            x.index_select(1, transformed), s.to(x.dtype), t.to(x.dtype)
        )
        return x.index_copy(1, transformed, x2), log_det

    # ----------------------------------------------------------------------------- the flow
    def f(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Data -> latent.  x: (N, D) -> (z (N, D), log_det (N,)), ``log_det = log|det dz/dx|``."""
        self._check_input(x, "x")
        z = x
        log_det = None
        for i in range(self.num_layers):
            z, ld = self.layer_forward(i, z)
            log_det = ld if log_det is None else log_det + ld
        return z, log_det

    def g(self, z: torch.Tensor) -> torch.Tensor:
        """Latent -> data, the exact inverse of :meth:`f`.  (N, D) -> (N, D)."""
        self._check_input(z, "z")
        x = z
        for i in reversed(range(self.num_layers)):
            x, _ = self.layer_inverse(i, x)
        return x
