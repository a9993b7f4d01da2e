"""Trace a model to an ATen-level torch.fx graph with exact shapes (``torch.export``, non-strict).

Why export rather than ``symbolic_trace``: export specialises data-dependent
control flow to the example input, so every timm family traces, and it lifts
every parameter and buffer to a graph input, so no weight hides inside an
opaque leaf module (see docs/design.md).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch.export.graph_signature import InputKind, OutputKind

__all__ = ["TracedModel", "trace", "TraceError", "mode_of"]


class TraceError(RuntimeError):
    """The model could not be exported to a graph for the given example inputs."""


@dataclass
class TracedModel:
    """An exported graph plus the map from its placeholders to state-dict keys."""

    graph: torch.fx.Graph
    placeholder_key: dict[str, str]  # placeholder name -> state-dict key (params, persistent buffers)
    placeholder_kind: dict[str, str]  # placeholder name -> "param" | "buffer" | "nonpersistent" | "constant" | "input"
    aliases: dict[str, list[str]]  # state-dict key -> other keys holding the same tensor (tied weights)
    # placeholder name -> per axis, whether the tensor is the same along it (non-persistent buffers and
    # constants, whose values are known here: any permutation of such an axis leaves them unchanged)
    uniform_axes: dict[str, tuple[bool, ...]] = field(default_factory=dict)
    # output node name -> state-dict key of the buffer it overwrites (a buffer mutation, not a model output)
    mutations: dict[str, str] = field(default_factory=dict)
    mode: str = "eval"  # the mode (train or eval) the graph was traced in

    @functools.cached_property
    def dead_nodes(self) -> frozenset:
        """Ops whose value nothing reads (directly or through other such ops) and that have no side effect.

        They cannot change an output, so they neither couple nor pin (``x[:, :, -1]`` taken only for its
        shape). Computed once per graph.
        """
        dead: set = set()
        for n in reversed(self.graph.nodes):
            if n.op == "call_function" and all(u in dead for u in n.users):
                try:
                    pure = not n.is_impure()
                except Exception:  # noqa: BLE001 - an op fx cannot classify counts as having side effects
                    pure = False
                if pure:
                    dead.add(n)
        return frozenset(dead)


def as_tuple(example_inputs) -> tuple:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def trace(model: torch.nn.Module, example_inputs) -> TracedModel:
    """Export ``model`` on ``example_inputs``; the model is not modified.

    >>> import torch
    >>> tm = trace(torch.nn.Linear(3, 2), torch.randn(1, 3))
    >>> sorted(tm.placeholder_key.values())
    ['bias', 'weight']
    """
    args = as_tuple(example_inputs)
    try:
        ep = torch.export.export(model, args, strict=False)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise TraceError(f"torch.export failed for {type(model).__name__}: {type(e).__name__}: {e}") from e
    persistent = set(model.state_dict().keys())
    key, kind = {}, {}
    for spec in ep.graph_signature.input_specs:
        name = spec.arg.name
        if spec.kind == InputKind.PARAMETER:
            key[name], kind[name] = spec.target, "param"
        elif spec.kind == InputKind.BUFFER:
            if spec.persistent is not False and spec.target in persistent:
                key[name], kind[name] = spec.target, "buffer"
            else:
                kind[name] = "nonpersistent"
        elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ, InputKind.TOKEN):
            kind[name] = "constant"
        else:
            kind[name] = "input"
    uniform = {name: uniform_axes(ep.constants[spec.target]) for spec in ep.graph_signature.input_specs
               if kind.get(spec.arg.name) in ("nonpersistent", "constant")
               and isinstance(ep.constants.get(spec.target), torch.Tensor) for name in [spec.arg.name]}
    mutations = {spec.arg.name: spec.target for spec in ep.graph_signature.output_specs
                 if spec.kind == OutputKind.BUFFER_MUTATION and spec.target in persistent}
    return TracedModel(ep.graph_module.graph, key, kind, _aliases(model), uniform, mutations, mode_of(model))


def mode_of(model: torch.nn.Module) -> str:
    """``"train"`` or ``"eval"``: the mode of the model's root module."""
    return "train" if model.training else "eval"


def uniform_axes(t: torch.Tensor) -> tuple[bool, ...]:
    """Per axis of ``t``, whether every slice along it is the same (a zero bias, a constant mask).

    >>> uniform_axes(torch.zeros(2, 3)), uniform_axes(torch.eye(2))
    ((True, True), (False, False))
    """
    if t.is_meta or t.numel() == 0:
        return (False,) * t.dim()
    return tuple(bool(torch.equal(t, t.narrow(a, 0, 1).expand_as(t))) for a in range(t.dim()))


def _aliases(model: torch.nn.Module) -> dict[str, list[str]]:
    by_id: dict[int, list[str]] = {}
    for k, t in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(t), []).append(k)
    return {ks[0]: ks[1:] for ks in by_id.values() if len(ks) > 1} | {
        k: [o for o in ks if o != k] for ks in by_id.values() if len(ks) > 1 for k in ks
    }
