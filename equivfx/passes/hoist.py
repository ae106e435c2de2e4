"""``hoist-projection``: with the mean readout, pool the slots before the trailing affine layers.

The mean over slots commutes with affine maps, mean_g(W s_g + b) = W mean_g(s_g) + b, so the head of
the network (flatten, linear layers, reshapes) runs once on the pooled value instead of |G| times.

Before::

    feat -> flatten -> fc -> equivfx_readout(mean) -> output        (fc runs on |G| B rows)

After::

    feat -> equivfx_pool -> flatten -> fc -> output                 (fc runs on B rows)

Only a chain of affine, slot-wise nodes with one batch-carrying input and one user each is moved;
mixing layers, dropout (its masks differ per slot in training) and ops with batch statistics stop
the chain. So do reductions (a mean over tokens or pixels): pooling after them pools, and with
``chunk`` accumulates, a value that much smaller, for the same arithmetic. Nothing moves where a
node from the head on may write in place (the pooled head would read the value before the write),
or where the value pooled is not floating (by the example inputs' dtypes; without them, where the
head converts dtypes). Outputs are unchanged up to float rounding.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from equivfx.meta import REP, BatchSize, Folded, OutputRep, set_rep
from equivfx.passes.infra import Pass, PassResult, new_node_origin
from equivfx.passes.modules import Readout
from equivfx.passes.projection import READOUT_NAME
from equivfx.passes.rules import draws_random, lookup, rule_key

__all__ = ["HoistProjection", "POOL_NAME"]

POOL_NAME = "equivfx_pool"


class HoistProjection(Pass):
    name = "hoist-projection"
    requires = frozenset({REP})
    provides = frozenset({REP})

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        modules = dict(gm.named_modules())
        readout = modules.get(READOUT_NAME)
        if not isinstance(readout, Readout) or readout.readout != "invariant":
            return PassResult(gm, False)
        if readout.pool != "mean":
            return PassResult(gm, False)
        modified = False
        for rnode in [
            n for n in gm.graph.nodes if n.op == "call_module" and n.target == READOUT_NAME
        ]:
            if rnode.kwargs.get("batch_axis", 0) != 0:
                continue
            chain = self._chain(rnode.args[0], modules)
            if not chain:
                continue
            modified |= self._hoist(gm, rnode, chain)
        return PassResult(gm, modified)

    def _affine(self, node: fx.Node, modules) -> bool:
        if node.op not in ("call_module", "call_function", "call_method"):
            return False
        if node.meta.get("equivfx.mixing") or node.meta.get("equivfx.rule") == "mix-gather":
            return False
        module = modules.get(node.target) if node.op == "call_module" else None
        if draws_random(node, module):
            return False
        rule = lookup(rule_key(node, module))
        rep = node.meta.get(REP)
        return bool(
            rule is not None
            and rule.linear
            and rule.kind != "reduction"  # pool after a sum or mean: a smaller value to pool
            and isinstance(rep, Folded)
            and not rep.container
            and rep.batch_axis == 0
        )

    def _chain(self, last: fx.Node, modules) -> list[fx.Node]:
        """Nodes from the head's start to ``last``, each affine with one folded input and one
        user."""
        chain: list[fx.Node] = []
        node = last
        while isinstance(node, fx.Node) and self._affine(node, modules) and len(node.users) == 1:
            folded = [a for a in node.all_input_nodes if isinstance(a.meta.get(REP), Folded)]
            if len(folded) != 1:
                break
            chain.append(node)
            node = folded[0]
        if not chain or not isinstance(node.meta.get(REP), Folded):
            return []
        chain.reverse()
        return chain

    def _hoist(self, gm: fx.GraphModule, rnode: fx.Node, chain: list[fx.Node]) -> bool:
        first = chain[0]
        src = next(a for a in first.all_input_nodes if isinstance(a.meta.get(REP), Folded))
        if src.meta.get(REP).batch_axis != 0 or not _shapes_rereadable(chain, src):
            return False
        if _mutation_from(first, modules=dict(gm.named_modules())) or not _floating(src, chain):
            return False
        readout = gm.get_submodule(READOUT_NAME)
        if not hasattr(gm, POOL_NAME):
            gm.add_submodule(POOL_NAME, Readout(readout.group, "invariant", "mean"))
        rep = rnode.meta.get(REP)
        # right before the head, not right after src: ops between them may change src in place
        with gm.graph.inserting_before(first):
            pooled = gm.graph.call_module(POOL_NAME, (src,))
        new_node_origin(pooled, self.name)
        set_rep(pooled, rep if isinstance(rep, OutputRep) else OutputRep("invariant", None), "pool")
        first.replace_input_with(src, pooled)
        _private_shapes(gm, chain, src, pooled)
        for n in chain:
            set_rep(n, pooled.meta[REP], n.meta.get("equivfx.rule"))
        rnode.replace_all_uses_with(chain[-1])
        gm.graph.erase_node(rnode)
        return True


_IN_PLACE_OPERATORS = frozenset(
    {
        operator.iadd,
        operator.isub,
        operator.imul,
        operator.itruediv,
        operator.ifloordiv,
        operator.imod,
        operator.ipow,
        operator.iand,
        operator.ior,
        operator.ixor,
        operator.ilshift,
        operator.irshift,
        operator.setitem,
    }
)


def _mutates(node: fx.Node, modules) -> bool:
    """The node may write into one of its inputs: an in-place method or function (``add_``,
    ``torch.relu_``, ``x[i] = v``, ``+=``), ``inplace=True``, or an ``out=`` argument."""
    if node.kwargs.get("inplace") is True or "out" in node.kwargs:
        return True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _IN_PLACE_OPERATORS or (
            name.endswith("_") and not name.startswith("__")
        )
    if node.op == "call_module":
        return getattr(modules.get(node.target), "inplace", False) is True
    return False


def _mutation_from(first: fx.Node, modules) -> bool:
    """Some node from ``first`` on may write in place. The pool goes right before ``first``; a
    value written after that (the head's source, or any alias of it) would differ between the
    pooled head and the per-slot one, and with ``chunk`` the pools accumulate after each chunk's
    whole per-slot body, so any later write counts."""
    node = first
    while node.op != "output":
        if _mutates(node, modules):
            return True
        node = node.next
    return False


def _floating(src: fx.Node, chain: list[fx.Node]) -> bool:
    """The source can be averaged: a floating or complex dtype where example inputs gave one;
    without them, the head must not convert dtypes (a bool or integer source would reach the mean
    only through such a conversion, as in ``fc((b > 0).float())``)."""
    meta = src.meta.get("tensor_meta")
    dtype = getattr(meta, "dtype", None)
    if dtype is not None:
        return dtype.is_floating_point or dtype.is_complex
    return not any(_converts_dtype(n) for n in chain)


def _converts_dtype(node: fx.Node) -> bool:
    if node.op != "call_method":
        return False
    if node.target in ("float", "double", "half", "bfloat16", "type", "type_as"):
        return True
    return node.target == "to" and any(
        isinstance(a, torch.dtype) for a in (*node.args[1:], *node.kwargs.values())
    )


def _shape_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if isinstance(a.meta.get(REP), BatchSize)]


def _batch_read(node: fx.Node) -> bool:
    """``t.size(0)`` or ``len(t)``: the batch size and nothing else read off a folded tensor."""
    if node.op == "call_method" and node.target == "size":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return dim == 0
    return node.op == "call_function" and node.target is len


def _read_off(node: fx.Node) -> fx.Node | None:
    folded = [a for a in node.all_input_nodes if isinstance(a.meta.get(REP), Folded)]
    return folded[0] if len(folded) == 1 else None


def _shapes_rereadable(chain: list[fx.Node], src: fx.Node) -> bool:
    """Every shape value the chain uses can be re-read off the pooled value: it is read off ``src``
    itself (same sample shape), or it is the batch size read off any folded tensor on axis 0."""
    stack = [a for n in chain for a in _shape_inputs(n)]
    seen: set[fx.Node] = set()
    while stack:
        b = stack.pop()
        if b in seen:
            continue
        seen.add(b)
        t = _read_off(b)
        if t is not None and t is not src:
            if not (_batch_read(b) and t.meta[REP].batch_axis == 0) or not _same_rows(t, src):
                return False
        elif t is None and any(isinstance(a.meta.get(REP), Folded) for a in b.all_input_nodes):
            return False
        stack.extend(_shape_inputs(b))
    return True


def _same_rows(a: fx.Node, b: fx.Node) -> bool:
    """Folded ``a`` and ``b`` have as many rows, where example inputs gave their shapes (a
    reshape(-1, C) of tokens folds |G| B T rows, and its pooled size is B T, not B)."""
    ma, mb = a.meta.get("tensor_meta"), b.meta.get("tensor_meta")
    shape_a, shape_b = getattr(ma, "shape", None), getattr(mb, "shape", None)
    if not shape_a or not shape_b:
        return True  # without examples: assumed (|G| B rows each)
    return shape_a[0] == shape_b[0]


def _private_shapes(gm: fx.GraphModule, chain: list[fx.Node], src: fx.Node, pooled: fx.Node):
    """Give the moved nodes their own shape values, read off the pooled value (batch B, not |G| B).

    Shape values computed for other nodes (``B = x.size(0)`` used before the pool as well) stay as
    they are; the chain gets copies whose reads of folded tensors now read ``pooled``.
    """
    memo: dict[fx.Node, fx.Node] = {}

    def private(b: fx.Node, before: fx.Node) -> fx.Node:
        if b in memo:
            return memo[b]
        t = _read_off(b)
        with gm.graph.inserting_before(before):
            if t is not None and t is not src:  # the batch size of another folded tensor
                new = gm.graph.call_method("size", (pooled, 0))
            else:
                new = gm.graph.node_copy(
                    b,
                    lambda a: (
                        pooled
                        if a is src
                        else private(a, before)
                        if isinstance(a.meta.get(REP), BatchSize)
                        else a
                    ),
                )
        new.meta.update({k: v for k, v in b.meta.items() if k.startswith("equivfx.")})
        new_node_origin(new, HoistProjection.name)
        memo[b] = new
        return new

    for n in chain:
        for b in _shape_inputs(n):
            n.replace_input_with(b, private(b, n))
    for b in reversed(list(gm.graph.nodes)):  # originals only the chain used are dead now
        if b in memo and not b.users:
            gm.graph.erase_node(b)
