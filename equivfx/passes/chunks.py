"""Evaluating k slots at a time (``compile(..., chunk=k)`` or ``chunk="auto"``).

Folding all |G| slots into the batch is fastest for small batches, but a folded batch of |G| B
samples can fall out of cache (and needs |G| times the activation memory). :class:`SlotChunks` runs
the part of the compiled graph between the lift and the readout k slots at a time and joins the
results before
the readout, so peak activation memory is about that of the base model at batch k B.

The flat compiled graph is split into three parts that share its modules:

- *pre*: everything that does not depend on the lift (inputs, parameters, deferred ops);
- *body*: the lift and every node between it and the readout (or the hoisted pool), run per chunk;
- *post*: the readout (or pool) and what follows it, run once on the joined slots.

``chunk="auto"`` measures, at the first call for each input shape (in eval mode), the time of each
chunk size that divides |G| and keeps the fastest; in training mode, and while being traced or
exported, all slots run in one pass (batch statistics must see every slot). "Training" means any of
the model's own modules is in training mode.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.fx as fx
from torch import nn

from equivfx.errors import NotYetSupportedError, explain
from equivfx.passes.hoist import POOL_NAME
from equivfx.passes.lift import LIFT_NAME
from equivfx.passes.projection import READOUT_NAME
from equivfx.trace import OPAQUE_ATTR, install_prefix_hooks

__all__ = ["SlotChunks", "chunked_module", "CHUNKS_NAME"]

log = logging.getLogger(__name__)

CHUNKS_NAME = "equivfx_chunks"


def _is_tracing() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is None:
        return False
    exporting = getattr(compiler, "is_exporting", lambda: False)
    return bool(compiler.is_compiling() or exporting())


class SlotChunks(nn.Module):
    """Runs a flat compiled graph k slots at a time. See the module docstring.

    Args:
        flat: the flat compiled GraphModule (held, not registered: its modules are registered on
            the graph module that owns this one, so the state dict keeps the original keys).
        chunk: slots per pass, or ``"auto"``.
    """

    def __init__(self, flat: fx.GraphModule, chunk: int | str):
        super().__init__()
        object.__setattr__(self, "flat", flat)  # shared, not a child: no duplicate state-dict keys
        self.chunk = chunk
        self.slots = tuple(flat.equivfx_lift.slots)  # fewer than |G| after eliminate-dead-slots
        self.order = len(self.slots)
        self.chosen: dict[tuple, int] = {}
        self.pre, self.body, self.post, self.lift, self.join = _split(flat)
        self._free_after = _last_uses(self.body, self.lift, keep=self.join.args[0])
        object.__setattr__(self, "interp", fx.Interpreter(flat, garbage_collect_values=False))
        object.__setattr__(self, "owner", None)  # the graph module that registers flat's state
        # fx and equivfx make plain nn.Module containers for dotted paths: their flag means nothing
        self._user_modules = [
            m
            for name, m in flat.named_modules()
            if name and not name.startswith("equivfx") and type(m) is not nn.Module
        ]

    # -------------------------------------------------------------------- running
    def forward(self, *args):
        if self.owner is not None:  # .to() replaced the owner's root-level buffers: share them
            for name in self.flat._buffers:
                self.flat._buffers[name] = self.owner._buffers[name]
        k = self._decided(args)
        if k is None:  # chunk="auto", first call for this input: measure
            k = self._measured(args)
        return self._run(args, k)

    def _run(self, args, k: int):
        """One forward, k slots per pass."""
        if k >= self.order:  # one pass: the flat graph's generated code, no interpreter
            return self.flat(*args)
        interp = self.interp
        interp.env = {}
        args_iter = iter(args)
        env = interp.env
        for node in self.pre:
            if node.op == "placeholder":
                env[node] = next(args_iter)
            else:
                env[node] = interp.run_node(node)
        lifted_input = env[self.lift.args[0]]
        parts = [
            self._run_body(interp, lifted_input, self.slots[s : s + k])
            for s in range(0, self.order, k)
        ]
        axis = self.join.kwargs.get("batch_axis", 0)
        env[self.join.args[0]] = parts[0] if len(parts) == 1 else torch.cat(parts, axis)
        for node in self.post:
            if node.op == "output":
                out = interp.fetch_args_kwargs_from_env(node)[0][0]
                interp.env = {}
                return out
            env[node] = interp.run_node(node)
        raise RuntimeError("equivfx: compiled graph has no output")  # pragma: no cover

    def _run_body(self, interp: fx.Interpreter, x, slots) -> torch.Tensor:
        env = interp.env
        env[self.lift] = self.flat.equivfx_lift.lift_slots(x, list(slots))
        for node in self.body:
            env[node] = interp.run_node(node)
            for done in self._free_after[node]:  # as generated code does: drop dead activations
                del env[done]
        return env.pop(self.join.args[0])

    @staticmethod
    def _key(args) -> tuple:
        return tuple(
            (tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else a for a in args
        )

    def _decided(self, args) -> int | None:
        """Slots per pass, or None where chunk="auto" has not measured this input yet."""
        if _is_tracing() or any(m.training for m in self._user_modules):
            return self.order  # training: batch statistics must see every slot
        if self.chunk != "auto":
            return int(self.chunk)
        if self.order == 1:  # one slot computed: nothing to choose
            return 1
        return self.chosen.get(self._key(args))

    def _measured(self, args) -> int:
        key = self._key(args)
        with torch.no_grad():
            self.chosen[key] = self._measure(args)
        log.info(
            "equivfx: chunk='auto' chose %d of %d slots per pass for %s",
            self.chosen[key],
            self.order,
            key,
        )
        return self.chosen[key]

    def _measure(self, args) -> int:
        """Time a whole forward for each k dividing the number of slots: a warm-up round, then
        the minimum of three interleaved rounds (interleaving spreads machine noise over every
        candidate)."""
        sizes = [d for d in range(1, self.order + 1) if self.order % d == 0]
        best = {k: float("inf") for k in sizes}
        for round_ in range(4):
            for k in sizes:
                t = time.perf_counter()
                self._run(args, k)
                if round_:  # round 0 warms caches and the allocator
                    best[k] = min(best[k], time.perf_counter() - t)
        return min(sizes, key=lambda k: (best[k], -k))

    def extra_repr(self) -> str:
        chosen = f", chosen={sorted(set(self.chosen.values()))}" if self.chosen else ""
        return f"chunk={self.chunk!r}, slots={self.order}{chosen}"


def _last_uses(body: list[fx.Node], lift: fx.Node, keep: fx.Node) -> dict:
    """For each body node, the chunk values that are dead once it has run (never ``keep``)."""
    scope = set(body) | {lift}
    last: dict[fx.Node, fx.Node] = {}
    for node in body:
        for a in node.all_input_nodes:
            if a in scope:
                last[a] = node
    free: dict[fx.Node, list] = {n: [] for n in body}
    for value, user in last.items():
        if value is not keep:
            free[user].append(value)
    return free


def _split(flat: fx.GraphModule):
    nodes = list(flat.graph.nodes)
    lifts = [n for n in nodes if n.op == "call_module" and n.target == LIFT_NAME]
    joins = [n for n in nodes if n.op == "call_module" and n.target in (POOL_NAME, READOUT_NAME)]
    repeats = [
        n for n in nodes if n.op == "call_module" and str(n.target).startswith("equivfx_repeat_")
    ]
    gathers = [n for n in nodes if n.meta.get("equivfx.mixing")]
    why = None
    if len(lifts) != 1:
        why = "a single lifted input"
    elif repeats:
        why = "a model with one batched input (others are repeated per slot)"
    elif gathers:
        why = "global mode (mixing layers read every slot at once)"
    else:
        pools = [n for n in joins if n.target == POOL_NAME]
        joins = pools or joins
        if len(joins) != 1:
            why = "a model with a single output tensor"
    if why:
        raise NotYetSupportedError(
            explain("chunk= is supported for " + why + " only", why, why, "use chunk=None")
        )
    lift, join = lifts[0], joins[0]
    body: list[fx.Node] = []
    downstream = {lift}
    for n in nodes[nodes.index(lift) + 1 : nodes.index(join)]:
        if any(a in downstream for a in n.all_input_nodes):
            downstream.add(n)
            body.append(n)
    body_set = set(body)
    post = nodes[nodes.index(join) :]
    pre = [n for n in nodes if n not in body_set and n is not lift and n not in post]
    for n in post:
        if any(a in body_set for a in n.all_input_nodes) and n is not join:
            raise NotYetSupportedError(
                explain(
                    "chunk= needs the output to depend on the slots through the readout only",
                    n.name,
                    "one readout",
                    "use chunk=None",
                )
            )
    return pre, body, post, lift, join


def chunked_module(flat: fx.GraphModule, chunk: int | str) -> fx.GraphModule:
    """A graph module computing what ``flat`` computes, k slots at a time.

    It registers ``flat``'s submodules, parameters and buffers under the same names (so the state
    dict has the original keys) and keeps ``flat`` as ``equivfx_flat`` for localisation and
    inspection.
    """
    if chunk != "auto" and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
        raise NotYetSupportedError(
            explain(
                "chunk must be a positive int, 'auto' or None",
                chunk,
                "e.g. chunk=2",
                "pass the number of slots per pass",
            )
        )
    runner = SlotChunks(flat, chunk)
    root = nn.Module()
    root.add_module(CHUNKS_NAME, runner)
    graph = fx.Graph()
    placeholders = [graph.placeholder(n.target) for n in flat.graph.nodes if n.op == "placeholder"]
    graph.output(graph.call_module(CHUNKS_NAME, tuple(placeholders)))
    gm = fx.GraphModule(root, graph, class_name=type(flat).__name__)
    # the same modules, parameters and buffers under the same names: the original state-dict keys
    for name, child in flat.named_children():
        gm.add_module(name, child)
    for name, p in flat._parameters.items():
        gm.register_parameter(name, p)
    for name, b in flat._buffers.items():
        gm.register_buffer(name, b, persistent=name not in flat._non_persistent_buffers_set)
    if hasattr(flat, OPAQUE_ATTR):  # the opaque path hides its prefix in state-dict keys
        install_prefix_hooks(gm, OPAQUE_ATTR)
    object.__setattr__(runner, "owner", gm)
    object.__setattr__(gm, "equivfx_flat", flat)
    return gm
