"""A conditional Real NVP as the density estimator of `sbi <https://sbi-dev.github.io/sbi/>`_.

``realnvp_nn(...)`` returns a builder for sbi's ``density_estimator=`` argument: sbi calls it
with the first round's simulations and trains what it returns, and the posterior samples and
evaluates through sbi's own API::

    from sbi.inference import NPE
    from fastnvp.integrations.sbi import realnvp_nn

    inference = NPE(prior, density_estimator=realnvp_nn(num_layers=8, hidden=64))
    inference.append_simulations(theta, x).train()
    posterior = inference.build_posterior()
    samples = posterior.sample((1000,), x=x_o)          # (1000, D)
    log_p = posterior.log_prob(samples, x=x_o)          # (1000,)

The estimator models p(theta | x) with a :class:`fastnvp.FastRealNVP` conditioned on x
(docs/design.md §1.7), with sbi's z-scoring conventions:

- theta is standardised by the affine map ``u = (theta - mean) / std`` (statistics of the
  training batch, as sbi's ``standardizing_transform``); the flow models u and ``log_prob``
  adds the map's log-determinant ``-Σ log std``, so densities are densities of theta.
- x goes through sbi's ``standardizing_net`` followed by the user's ``embedding_net``; that
  composition is the flow's ``embedding`` (``model.embedding``), applied once per call.

theta with one feature (D = 1) cannot be split by a coupling layer (every mask keeps and
transforms at least one feature, docs/design.md §1.2). The flow then runs on (u, 0): a dummy
feature that every layer keeps, fixed at 0, with a prior that is N(0, 1) on u and ignores the
dummy, so ``log_prob`` and ``sample`` are exact. Each layer is then an affine map of u whose
scale and shift depend on x, so for D = 1 the estimate is a Gaussian whose mean and variance
depend on x — the same limit as sbi's own affine flows (MAF) in one dimension.

Importing this module needs sbi (``pip install fastnvp[sbi]``); ``import fastnvp`` does not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

try:
    from sbi.neural_nets.estimators import ConditionalDensityEstimator
    from sbi.utils.sbiutils import standardizing_net, z_score_parser, z_standardization
except ImportError as error:  # pragma: no cover - exercised only without sbi
    raise ImportError(
        "fastnvp.integrations.sbi needs the sbi package; install it with "
        "`pip install fastnvp[sbi]` (or `pip install sbi`)"
    ) from error

__all__ = ["RealNVPBuilder", "RealNVPDensityEstimator", "realnvp_nn"]

_Z_SCORE_OPTIONS = ("independent", "structured", "none", None)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class PaddedStandardNormal:
    """Prior of the D = 1 flow over (u, dummy): N(u; 0, 1), the dummy fixed at 0.

    ``log_prob`` ignores the dummy column and ``sample`` returns it as zeros, so a flow whose
    layers all keep the dummy has ``log_prob((u, 0)) = log p(u)`` exactly and samples (u, 0).
    """

    def log_prob(self, z: Tensor) -> Tensor:
        """(N, 2) -> (N,): ``-0.5 * (z[:, 0]**2 + log 2π)``."""
        return -0.5 * z[:, 0].square() - _HALF_LOG_2PI

    def sample(self, sample_shape: Sequence[int]) -> Tensor:
        """``sample_shape`` (n,) -> (n, 2): column 0 standard normal, column 1 zeros."""
        (n,) = tuple(sample_shape)
        return torch.cat([torch.randn(n, 1), torch.zeros(n, 1)], dim=1)


class RealNVPDensityEstimator(ConditionalDensityEstimator):
    """sbi's ``ConditionalDensityEstimator`` around a conditional fastnvp flow.

    The flow (``self.net``) models the standardised ``u = (theta - mean) / std``, flattened to
    (N, D), given the condition x flattened to (N, C); its embedding (standardising and the
    user's embedding net) sees x in its original shape. Shape conventions are sbi's: inputs
    ``(sample_dim, batch_dim, *input_shape)``, conditions ``(batch_dim, *condition_shape)``.

    Args:
        flow: a conditional flow with ``context=C`` (``C = prod(condition_shape)``) over
            ``D`` features, or ``D + 1`` with ``padded`` (D = 1): ``log_prob(u, context)``,
            ``sample(n, context)`` and ``sample_and_log_prob(n, context)`` as
            :class:`fastnvp.FastRealNVP`.
        input_shape: event shape of theta, e.g. ``(D,)``.
        condition_shape: event shape of x, e.g. ``(C,)``.
        theta_mean, theta_std: the z-score of theta, each broadcastable to ``input_shape``.
        padded: the flow runs on (u, 0) with a dummy last feature (D = 1, module docstring).
    """

    def __init__(
        self,
        flow: nn.Module,
        input_shape: torch.Size,
        condition_shape: torch.Size,
        theta_mean: Tensor,
        theta_std: Tensor,
        padded: bool = False,
    ) -> None:
        super().__init__(net=flow, input_shape=input_shape, condition_shape=condition_shape)
        features = self.input_shape.numel()
        mean = torch.as_tensor(theta_mean, dtype=torch.float32).expand(self.input_shape)
        std = torch.as_tensor(theta_std, dtype=torch.float32).expand(self.input_shape)
        if not bool(torch.all(std > 0)):
            raise ValueError("theta_std must be > 0 in every feature")
        self.register_buffer("_theta_mean", mean.reshape(features).clone())
        self.register_buffer("_theta_std", std.reshape(features).clone())
        self._padded = bool(padded)

    @property
    def embedding_net(self) -> nn.Module | None:
        """The module that maps x to the flow's conditioner input (None: x used as is)."""
        return getattr(self.net, "embedding", None)

    def _log_abs_det(self) -> Tensor:
        """log |det du/dtheta| of the z-score, ``-Σ log std``: a scalar."""
        return -torch.log(self._theta_std).sum()

    def _to_flow(self, theta: Tensor) -> Tensor:
        """theta (R, *input_shape) -> u (R, D), or (R, 2) with the zero dummy when padded."""
        u = (theta.reshape(theta.shape[0], -1) - self._theta_mean) / self._theta_std
        if self._padded:
            u = torch.cat([u, u.new_zeros(u.shape[0], 1)], dim=1)
        return u

    def _from_flow(self, u: Tensor) -> Tensor:
        """u (..., D) or (..., 2) padded -> theta (..., *input_shape)."""
        if self._padded:
            u = u[..., :1]
        theta = self._theta_mean + self._theta_std * u
        return theta.reshape(*u.shape[:-1], *self.input_shape)

    def _flat_condition(self, condition: Tensor) -> tuple[Tensor, torch.Size]:
        """condition (*batch, *condition_shape) -> ((M, C), batch), M = prod(batch)."""
        self._check_condition_shape(condition)
        batch = condition.shape[: condition.ndim - len(self.condition_shape)]
        return condition.reshape(batch.numel(), self.condition_shape.numel()), batch

    def log_prob(self, input: Tensor, condition: Tensor, **kwargs) -> Tensor:
        """log p(theta | x).

        Args:
            input: theta, ``(sample_dim, batch_dim, *input_shape)`` or
                ``(batch_dim, *input_shape)``.
            condition: x, ``(batch_dim, *condition_shape)`` or
                ``(sample_dim, batch_dim, *condition_shape)``; batch dims broadcast.

        Returns:
            ``(sample_dim, batch_dim)`` log-densities of theta (the z-score's log-determinant
            included).
        """
        self._check_input_shape(input)
        self._check_condition_shape(condition)
        input, condition, batch_dim = self._broadcast_and_align(input, condition)
        sample_dim = input.shape[0]
        rows = sample_dim * batch_dim
        u = self._to_flow(input.reshape(rows, *self.input_shape))
        context = condition.reshape(rows, self.condition_shape.numel())
        log_prob = self.net.log_prob(u, context=context) + self._log_abs_det()
        return log_prob.reshape(sample_dim, batch_dim)

    def loss(self, input: Tensor, condition: Tensor, **kwargs) -> Tensor:
        """Negative log-likelihood: input (B, *input_shape), condition (B, *condition_shape)
        -> (B,)."""
        return -self.log_prob(input.unsqueeze(0), condition)[0]

    def sample(self, sample_shape: torch.Size, condition: Tensor, **kwargs) -> Tensor:
        """Draw theta ~ p(theta | x).

        Args:
            sample_shape: shape of the draws per condition, e.g. ``(n,)``.
            condition: x, ``(batch_dim, *condition_shape)``.

        Returns:
            ``(*sample_shape, batch_dim, *input_shape)``.
        """
        context, batch = self._flat_condition(condition)
        num_samples = torch.Size(sample_shape).numel()
        u = self.net.sample(num_samples, context=context)  # (n, M, D_flow)
        theta = self._from_flow(u)
        return theta.reshape(*sample_shape, *batch, *self.input_shape)

    def sample_and_log_prob(
        self, sample_shape: torch.Size, condition: Tensor, **kwargs
    ) -> tuple[Tensor, Tensor]:
        """Draws and their log-densities in one pass of the flow.

        Args:
            sample_shape: shape of the draws per condition, e.g. ``(n,)``.
            condition: x, ``(batch_dim, *condition_shape)``.

        Returns:
            theta ``(*sample_shape, batch_dim, *input_shape)`` and log p(theta | x)
            ``(*sample_shape, batch_dim)``.
        """
        context, batch = self._flat_condition(condition)
        num_samples = torch.Size(sample_shape).numel()
        u, log_prob = self.net.sample_and_log_prob(num_samples, context=context)
        theta = self._from_flow(u).reshape(*sample_shape, *batch, *self.input_shape)
        log_prob = (log_prob + self._log_abs_det()).reshape(*sample_shape, *batch)
        return theta, log_prob


def _check_z_score(value, name: str) -> tuple[bool, bool]:
    if value not in _Z_SCORE_OPTIONS:
        raise ValueError(
            f"{name} must be one of 'independent', 'structured' or 'none', got {value!r}"
            + (
                " (the Real NVP builder z-scores by an affine map; transform_to_unconstrained "
                "is not supported)"
                if value == "transform_to_unconstrained"
                else ""
            )
        )
    return z_score_parser(value)


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _flow_option_names() -> set[str]:
    """The keyword options :func:`realnvp_nn` passes on: those of ``FastRealNVP.standard`` and
    ``FastRealNVP.__init__``, less what the builder sets itself (sizes, context, embedding,
    prior) and the nets and masks ``standard`` makes."""
    import inspect

    from fastnvp.flows.fast_realnvp import FastRealNVP

    names = {
        p.name
        for fn in (FastRealNVP.standard, FastRealNVP.__init__)
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    own = {"self", "dim", "num_layers", "hidden", "context", "embedding", "prior"}
    return names - own - {"nets", "nett", "masks"}


class RealNVPBuilder:
    """sbi's density-estimator builder ``(batch_theta, batch_x) -> RealNVPDensityEstimator``.

    Made by :func:`realnvp_nn`; a plain object (not a closure), so an sbi inference object
    holding it pickles.
    """

    def __init__(
        self,
        num_layers: int,
        hidden: int,
        embedding_net: nn.Module | None,
        z_score_theta: str | None,
        z_score_x: str | None,
        flow_options: dict,
    ) -> None:
        self.num_layers = _check_positive_int(num_layers, "num_layers")
        self.hidden = _check_positive_int(hidden, "hidden")
        if embedding_net is not None and not isinstance(embedding_net, nn.Module):
            raise TypeError(
                f"embedding_net must be None or an nn.Module, got {type(embedding_net).__name__}"
            )
        self.embedding_net = embedding_net
        _check_z_score(z_score_theta, "z_score_theta")
        _check_z_score(z_score_x, "z_score_x")
        self.z_score_theta = z_score_theta
        self.z_score_x = z_score_x
        for key in ("context", "embedding", "prior", "dim"):
            if key in flow_options:
                raise TypeError(f"realnvp_nn sets {key!r} itself; do not pass it")
        unknown = sorted(set(flow_options) - _flow_option_names())
        if unknown:  # here, not when sbi first builds the estimator from a batch
            raise TypeError(
                f"realnvp_nn got unknown flow options {unknown}; it takes "
                f"{sorted(_flow_option_names())} (of fastnvp.FastRealNVP and its standard())"
            )
        self.flow_options = dict(flow_options)

    def __repr__(self) -> str:
        return (
            f"realnvp_nn(num_layers={self.num_layers}, hidden={self.hidden}, "
            f"z_score_theta={self.z_score_theta!r}, z_score_x={self.z_score_x!r})"
        )

    def _embedding(self, batch_x: Tensor) -> nn.Module | None:
        """The flow's embedding: (M, C) flat x -> unflatten -> z-score -> user net -> (M, E)."""
        condition_shape = batch_x.shape[1:]
        modules: list[nn.Module] = []
        if len(condition_shape) > 1:
            modules.append(nn.Unflatten(1, condition_shape))
        z_score, structured = _check_z_score(self.z_score_x, "z_score_x")
        if z_score:
            modules.append(standardizing_net(batch_x, structured))
        if self.embedding_net is not None and not isinstance(self.embedding_net, nn.Identity):
            modules.append(self.embedding_net)
        if not modules or (len(modules) == 1 and isinstance(modules[0], nn.Unflatten)):
            return None
        return nn.Sequential(*modules)

    def __call__(self, batch_theta: Tensor, batch_x: Tensor) -> RealNVPDensityEstimator:
        """Build the estimator for the training batch.

        Args:
            batch_theta: (N, *input_shape) parameters, used for the shape and theta's z-score.
            batch_x: (N, *condition_shape) simulations, used for the shape and x's z-score.
        """
        from fastnvp.core.conditioner import standard_net
        from fastnvp.flows.fast_realnvp import FastRealNVP

        if batch_theta.ndim < 2 or batch_x.ndim < 2 or batch_theta.shape[0] != batch_x.shape[0]:
            raise ValueError(
                "batch_theta and batch_x must be (N, *event_shape) with the same N, got "
                f"{tuple(batch_theta.shape)} and {tuple(batch_x.shape)}"
            )
        input_shape = batch_theta.shape[1:]
        condition_shape = batch_x.shape[1:]
        dim = input_shape.numel()
        context = condition_shape.numel()

        z_score, structured = _check_z_score(self.z_score_theta, "z_score_theta")
        if z_score:
            mean, std = z_standardization(batch_theta, structured)
        else:
            mean, std = torch.zeros(()), torch.ones(())

        embedding = self._embedding(batch_x)
        options = dict(self.flow_options)
        if dim >= 2:
            flow = FastRealNVP.standard(
                dim,
                self.num_layers,
                self.hidden,
                context=context,
                embedding=embedding,
                **options,
            )
        else:
            flow = self._padded_flow(
                FastRealNVP, standard_net, batch_x, context, embedding, options
            )
        return RealNVPDensityEstimator(
            flow, input_shape, condition_shape, mean, std, padded=dim == 1
        )

    def _padded_flow(self, cls, standard_net, batch_x, context, embedding, options):
        """The D = 1 flow over (u, dummy): every layer keeps the dummy and transforms u."""
        slope = options.pop("negative_slope", 0.01)
        width = _embedded_width(embedding, batch_x.reshape(batch_x.shape[0], -1)[:2])
        masks = torch.tensor([[0.0, 1.0]]).repeat(self.num_layers, 1)
        return cls(
            lambda: standard_net(2, self.hidden, tanh=True, negative_slope=slope, context=width),
            lambda: standard_net(2, self.hidden, tanh=False, negative_slope=slope, context=width),
            masks,
            prior=PaddedStandardNormal(),
            context=context,
            embedding=embedding,
            **options,
        )


def _embedded_width(embedding: nn.Module | None, probe: Tensor) -> int:
    """E: the width of ``embedding(probe)`` (C without an embedding); run in eval mode."""
    if embedding is None:
        return probe.shape[1]
    was_training = embedding.training
    embedding.eval()
    try:
        with torch.no_grad():
            out = embedding(probe)
    finally:
        embedding.train(was_training)
    return int(out.reshape(out.shape[0], -1).shape[1])


def realnvp_nn(
    num_layers: int = 8,
    hidden: int = 64,
    embedding_net: nn.Module | None = None,
    z_score_theta: str | None = "independent",
    z_score_x: str | None = "independent",
    **flow_options,
) -> RealNVPBuilder:
    """A builder for ``NPE(prior, density_estimator=realnvp_nn(...))``.

    Args:
        num_layers: coupling layers L of the Real NVP.
        hidden: width H of the standard conditioner MLPs (docs/design.md §1.3).
        embedding_net: optional module mapping x (N, *condition_shape) -> (N, E), trained with
            the flow; applied after x's z-score.
        z_score_theta: ``"independent"`` (per feature), ``"structured"`` (one mean and std
            for all features) or ``"none"``: the affine standardisation of theta, with its
            log-determinant in ``log_prob``.
        z_score_x: the same options for x, through sbi's ``standardizing_net``.
        **flow_options: further keyword arguments of :class:`fastnvp.FastRealNVP` (e.g.
            ``negative_slope``, ``clamp``, ``memory``, ``precision``); an unknown name raises
            ``TypeError`` here, not when sbi first builds the estimator.

    Returns:
        A callable ``(batch_theta (N, D), batch_x (N, *condition_shape)) ->``
        :class:`RealNVPDensityEstimator`.
    """
    return RealNVPBuilder(num_layers, hidden, embedding_net, z_score_theta, z_score_x, flow_options)
