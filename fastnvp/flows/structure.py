"""What a FastRealNVP's cached facts depend on, and how a call notices that it changed.

docs/design.md §3.1. The plan's facts (which layers are the standard pair, their H and slope,
the interleaved layers' kinds) and everything built on them (plans, packs, the parameter bank,
knot tables) are computed once, at construction and after ``load_state_dict``. A flow edited
after that, as any ``nn.Module`` may be, must not run on stale facts:

- a conditioner net replaced (``flow.s[1] = net``) or one of its modules (``flow.s[1][2] =
  nn.Tanh()``);
- a parametrization added to a Linear (``torch.nn.utils.parametrizations.weight_norm``), which
  swaps its class and moves its weight;
- a Linear's weight replaced by a new ``nn.Parameter``;
- a LeakyReLU's ``negative_slope`` set to another value;
- the mask replaced or written in place;
- ``clamp`` set to another value (which non-standard layers soft-clamp their log-scale);
- a forward hook registered on a module of a net the engine runs from its weights
  (``torch.nn.utils.prune`` recomputes the weight in one; an activation probe): the pair then
  runs as modules (``fastnvp.core.conditioner.engine_can_run``), and returns to the engine
  once the hooks are removed; likewise a hook on a norm or mixing layer makes the calls run
  those layers as modules (``FlowFacts.hooked_interleaved``) until it is removed.

The first three register a module or a parameter: a process-wide counter, bumped by
``torch.nn``'s global registration hooks, tells a call that something, somewhere, registered
since its flow last looked (one integer compare per call). The call then compares the flow's
:func:`signature` with the one its facts were built from (about 30 us at L = 8) and rebuilds
them if it differs. Slopes and ``clamp`` are plain attributes that no hook sees, a mask can be
written in place and a hook registers nothing: every call compares them, the mask's version
and the emptiness of the forward hook dicts with what :class:`StructureWatch` recorded (about
4 us at L = 8).
"""

from __future__ import annotations

import torch
from torch import nn

from fastnvp.core.conditioner import module_hooks
from fastnvp.core.interleave import step_layers

_registrations = [0]


def _count_registration(module, name, value) -> None:
    """Global ``nn.Module`` registration hook (modules and parameters): count, change nothing."""
    _registrations[0] += 1


torch.nn.modules.module.register_module_module_registration_hook(_count_registration)
torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)


def registrations() -> int:
    """How many modules and parameters the process has registered so far."""
    return _registrations[0]


def signature(model) -> list:
    """What the facts of ``model`` were read from: every conditioner net, norm and mixing
    layer, each module of the nets with its class, each Linear's weight shape and each
    LeakyReLU's slope, and the embedding. Compared with ``==``: modules and classes by
    identity, shapes and slopes by value."""
    out: list = [model.embedding]
    for container in (model.s, model.t, model.norms, model.permutations):
        if container is None:
            continue
        for net in container._modules.values():
            out += [net, type(net)]
            for module in net._modules.values():
                out += [module, type(module)]
                if type(module) is nn.LeakyReLU:
                    out.append(module.negative_slope)
                elif type(module) is nn.Linear:
                    weight = module._parameters.get("weight")
                    out.append(None if weight is None else weight.shape)
    return out


class StructureWatch:
    """What a flow's facts were built from, and the per-call test that it still holds.

    Built by the flow whenever it computes its facts. :meth:`changed` looks, per call, at the
    mask (replaced, or written in place), ``clamp``, the watched forward hook dicts and the
    standard pairs' slopes; at the :func:`signature` only when the process registered a module
    or parameter since.
    """

    __slots__ = (
        "seen",
        "signature",
        "mask",
        "mask_version",
        "slopes",
        "clamp",
        "hooks",
        "hooked",
    )

    def __init__(self, model):
        self.seen = registrations()
        self.signature = signature(model)
        self.mask = model._buffers["mask"]
        self.mask_version = self.mask._version
        self.slopes = _slopes(model)
        self.clamp = model.clamp
        self.hooks, self.hooked = _forward_hooks(model)

    def changed(self, model) -> bool:
        """Whether ``model`` differs from what its facts were built from."""
        mask = model._buffers["mask"]
        if mask is not self.mask or mask._version != self.mask_version:
            return True
        if model.__dict__["clamp"] != self.clamp:  # which layers soft-clamp their log-scale
            return True
        if any(self.hooks):  # a hook on a module the engine runs from its weights: run it
            return True
        if self.hooked and not any(self.hooked):  # the hooks are gone: the engine may again
            return True
        for module, slope in self.slopes:
            if module.negative_slope != slope:
                return True
        if _registrations[0] != self.seen:
            if signature(model) != self.signature:
                return True
            self.seen = _registrations[0]  # something else registered: nothing here moved
        return False


def _forward_hooks(model) -> tuple[tuple[dict, ...], tuple[dict, ...]]:
    """The forward hook dicts of the standard pairs' modules: of the pairs the engine runs
    from their weights (all empty when the facts were read: a hook registered later makes a
    call rebuild, and the pair then runs as modules, hooks and all), and of the pairs that
    run as modules for their hooks (when all are gone, a call rebuilds and the engine takes
    them back). Backward hooks count when the facts are read, not per call."""
    plain, hooked = [], []
    for i, runs in enumerate(model._standard):
        if not runs and not model._math_standard[i]:
            continue
        for net in (model.s[i], model.t[i]):
            (plain if runs else hooked).extend(module_hooks(net, forward_only=True))
    # The norm and mixing layers: the engine runs its own forms of them unless one has a hook.
    layers = [layer for i in range(model.num_layers) for layer in step_layers(model, i)]
    watched = hooked if model._facts.hooked_interleaved else plain
    for layer in layers:
        watched.extend(module_hooks(layer, forward_only=True))
    return tuple(plain), tuple(hooked)


def _slopes(model) -> tuple:
    """(activation, slope) of every LeakyReLU in the standard pairs (a slope is a plain
    attribute, which no registration hook sees)."""
    watch = []
    for i, standard in enumerate(model._standard):
        if not standard:
            continue
        for net in (model.s[i], model.t[i]):
            for module in net._modules.values():
                if type(module) is nn.LeakyReLU:
                    watch.append((module, module.negative_slope))
    return tuple(watch)
