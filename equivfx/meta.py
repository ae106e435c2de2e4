"""Node metadata: the ``equivfx.*`` keys of ``node.meta`` and their frozen values, defined once.

Representation types say how G acts on the value a node computes. They are plain frozen dataclasses
so
passes can compare them, tests can construct them, and ``equivfx inspect`` can print them.

- :class:`Trivial`: G acts trivially (parameters, constants, invariant values, shape arithmetic that
  does not involve the batch size).
- :class:`InputRep`: the value carries the input action (the model's input before the lift).
- :class:`Folded`: a Map(G, .) value whose slots are folded into a batch axis, slot-major: along
  ``batch_axis`` the tensor holds |G| blocks of the original batch, block i being slot g_i. G acts
  by
  the regular action, which permutes the blocks.
- :class:`ChannelFolded`: a Map(G, .) value whose slots are folded slot-major into the channel
  axis (axis 1) of a (B, |G| C, ...) tensor: the fused layer-wise layout between mixing layers.
- :class:`BatchSize`: a Python int (or tuple of ints) read off a folded tensor's shape;
``batch_dims``
  lists which entries hold the (folded) batch size.
- :class:`OutputRep`: a readout's value, with the action G has on it (regular on a slot axis,
trivial,
  or the user's output action).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "FIXED",
    "REP",
    "ORIGIN",
    "RULE",
    "Rep",
    "Trivial",
    "InputRep",
    "Folded",
    "ChannelFolded",
    "BatchSize",
    "OutputRep",
    "get_rep",
    "slot_major",
    "set_rep",
    "annotated_output_action",
    "check_meta",
]

REP = "equivfx.rep"
"""``node.meta[REP]``: a :class:`Rep`, how G acts on the node's value."""
ORIGIN = "equivfx.origin"
"""``node.meta[ORIGIN]``: the name of the pass that created the node (absent on the user's
nodes)."""
RULE = "equivfx.rule"
"""``node.meta[RULE]``: the name of the op rule that justified the node's representation."""
FIXED = "equivfx.fixed"
"""``node.meta[FIXED]`` on a placeholder: the non-tensor value the graph was traced with
(``equivfx.trace.trace``); G acts on it trivially."""


@dataclass(frozen=True)
class Rep:
    """Base of the representation types."""

    @property
    def kind(self) -> str:
        return type(self).__name__.lower()

    def describe(self) -> str:
        return self.kind


@dataclass(frozen=True)
class Trivial(Rep):
    """G acts trivially on the value."""

    def describe(self) -> str:
        return "trivial"


@dataclass(frozen=True)
class InputRep(Rep):
    """The value carries the model's input action (it is, or is computed before, the lift)."""

    action: Any

    def describe(self) -> str:
        return f"input({self.action.describe()})"


@dataclass(frozen=True)
class Folded(Rep):
    """Map(G, .) with the |G| slots folded slot-major into ``batch_axis``; G permutes the blocks."""

    batch_axis: int = 0
    container: bool = False  # a tuple/list of such tensors (split, RNN outputs, max with dim)
    items: tuple = ()
    """For a container whose entries differ: entry i's representation (an RNN's output folded
    in ``batch_axis``, its final state ``(layers, B, H)`` always in axis 1); empty: every entry
    is ``Folded(batch_axis)``."""

    def describe(self) -> str:
        return f"map(G) folded in axis {self.batch_axis}"


@dataclass(frozen=True)
class CosetFolded(Rep):
    """One slot per left coset gK of a subgroup K, folded slot-major into axis 0: block j holds the
    network applied to ``slots[j]^-1 . x``. A later :class:`~equivfx.passes.modules.CosetLift`
    makes every slot from these by acting with K (``defer-lift-to-cosets``)."""

    slots: tuple[int, ...] = ()

    def describe(self) -> str:
        return f"map(G) folded in axis 0, one slot per coset ({len(self.slots)})"


@dataclass(frozen=True)
class ChannelFolded(Rep):
    """Map(G, .) with the |G| slots folded slot-major into the channel axis: a (B, |G| C, ...)
    tensor whose channel block i is slot g_i (``keep-channel-layout``, between fused mixing
    layers); G permutes the channel blocks. ``axis=-1``: into the last axis, the features of
    linear layers, (B, ..., |G| F)."""

    slots: int = 1
    axis: int = 1

    def describe(self) -> str:
        where = "1 (channels" if self.axis == 1 else f"{self.axis} (features"
        return f"map(G) folded in axis {where}, {self.slots} blocks)"


@dataclass(frozen=True)
class BatchSize(Rep):
    """A Python int or tuple read off a folded tensor's shape; ``batch_dims`` holds the batch size.

    For an int, ``batch_dims`` is ``(0,)`` when the int is (a multiple of) the folded batch size and
    ``()`` otherwise; for a shape tuple it lists the positions that hold the batch size.
    """

    batch_dims: tuple[int, ...] = ()

    def describe(self) -> str:
        return f"shape(batch at {list(self.batch_dims)})"


@dataclass(frozen=True)
class OutputRep(Rep):
    """A readout's value and the action G has on it."""

    readout: str
    action: Any

    def describe(self) -> str:
        return f"{self.readout}({self.action.describe()})"


def slot_major(rep) -> bool:
    """``rep`` is a :class:`Folded` tensor (not a container) with its slots in axis 0."""
    return isinstance(rep, Folded) and rep.batch_axis == 0 and not rep.container


def get_rep(node) -> Rep | None:
    """The node's representation, or None when no pass annotated it."""
    return node.meta.get(REP)


def annotated_output_action(graph) -> Any | None:
    """The action G has on the graph's output, as its readout's annotation records it (the first
    :class:`OutputRep`), or None where no node carries one."""
    for node in graph.nodes:
        rep = get_rep(node)
        if isinstance(rep, OutputRep):
            return rep.action
    return None


def set_rep(node, rep: Rep, rule: str | None = None) -> None:
    """Annotate ``node`` with ``rep`` (and the rule that justified it)."""
    node.meta[REP] = rep
    if rule is not None:
        node.meta[RULE] = rule


def check_meta(gm) -> None:
    """Check the equivfx metadata of a graph: every node annotated with a Rep value.

    Raises:
        ValueError: naming the first node whose ``equivfx.rep`` is missing or not a Rep.
    """
    for node in gm.graph.nodes:
        rep = node.meta.get(REP)
        if not isinstance(rep, Rep):
            raise ValueError(
                f"node {node.name} ({node.op} {node.target}) has equivfx.rep={rep!r}; "
                "expected a Rep value from equivfx.meta"
            )
