"""``hoist-projection``: with the mean readout, pool the slots before the trailing affine layers.

The mean over slots commutes with affine maps, mean_g(W s_g + b) = W mean_g(s_g) + b, so the head of
the network (flatten, linear layers, reshapes) runs once on the pooled value instead of |G| times.

Before::

    feat -> flatten -> fc -> equivfx_readout(mean) -> output        (fc runs on |G| B rows)

After::

    feat -> equivfx_pool -> flatten -> fc -> output                 (fc runs on B rows)

The head moved is a tree of affine, slot-wise nodes with one user each, reached from the readout
through their folded inputs; a node with several folded inputs joins only if it is jointly linear
in them (a sum, a difference, a concatenation or a stack: mean_g(a_g + b_g) = mean_g a_g + mean_g
b_g, not so a product), and each folded value the tree reads is pooled once, right before the
head (so each must exist by then). Mixing layers, dropout (its masks differ per slot in training)
and ops with batch statistics stop the tree. So do reductions (a mean over tokens or pixels):
pooling after them pools, and with ``chunk`` accumulates, a value that much smaller, for the same
arithmetic. Nothing moves where a node from the head on may write in place (in-place ops, and
untraced leaves, which may do anything; the pooled head would read a value from before the
write), where a value pooled or computed in the head is not floating (by the example inputs'
dtypes; without them, where the head converts dtypes), or where the values pooled, or one a batch
size is read off, differ in rows (tokens folded into the batch axis; known from example inputs).
Where the tree is refused, or has several sources without example inputs, the chain above its
first join moves instead; a tuple-valued source is not pooled, the item the head reads from it is.
The pool averages bools and integers in the default float dtype (``x + 0.5`` promotes them in the
head without a cast to see). Outputs are unchanged up
to float rounding.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from equivfx.meta import REP, BatchSize, Folded, OutputRep, set_rep
from equivfx.passes.infra import Pass, PassResult, new_node_origin
from equivfx.passes.lift import LIFT_NAME
from equivfx.passes.modules import Readout
from equivfx.passes.projection import READOUT_NAME
from equivfx.passes.rules import draws_random, lookup, mutates, node_module, rule_key

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
            order = {n: i for i, n in enumerate(gm.graph.nodes)}
            # the tree, else the chain above its first join: where the tree is refused, or has
            # several sources whose rows and dtypes no example inputs gave
            for tree in (True, False):
                chain, sources = self._head(rnode.args[0], modules, order, tree)
                if not chain:
                    break
                if tree and len(sources) > 1 and not all(_known(s) for s in sources):
                    continue
                if self._hoist(gm, rnode, chain, sources, modules, order):
                    modified = True
                    break
                if len(sources) == 1:  # the tree is the chain: nothing else to try
                    break
        return PassResult(gm, modified)

    def _affine(self, node: fx.Node, modules) -> bool:
        if node.op not in ("call_module", "call_function", "call_method"):
            return False
        if node.meta.get("equivfx.mixing") or node.meta.get("equivfx.rule") == "mix-gather":
            return False
        module = node_module(node, modules)
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

    def _head(
        self, last: fx.Node, modules, order: dict[fx.Node, int], tree: bool
    ) -> tuple[list[fx.Node], list[fx.Node]]:
        """The head ending at ``last``, in graph order, and the folded values it reads (each
        once, in graph order); empty if ``last`` cannot move. The head is a tree: each node is
        affine with one user, and one with several folded inputs must be jointly linear in
        them."""
        head: list[fx.Node] = []
        sources: list[fx.Node] = []
        stack, seen = [last], set()
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            folded = list(
                dict.fromkeys(
                    a for a in node.all_input_nodes if isinstance(a.meta.get(REP), Folded)
                )
            )
            if (
                self._affine(node, modules)
                and len(node.users) == 1
                and folded
                and not any(a.meta[REP].container for a in folded)  # pool its getitem instead
                and (len(folded) == 1 or (tree and _jointly_linear(node, modules)))
                and all(_batch_free(a) for a in node.all_input_nodes if a not in folded)
            ):
                head.append(node)
                stack.extend(folded)
            elif node is not last and isinstance(node.meta.get(REP), Folded):
                sources.append(node)
            else:
                return [], []
        return sorted(head, key=order.get), sorted(sources, key=order.get)

    def _hoist(
        self,
        gm: fx.GraphModule,
        rnode: fx.Node,
        chain: list[fx.Node],
        sources: list[fx.Node],
        modules,
        order: dict[fx.Node, int],
    ) -> bool:
        first = chain[0]
        if any(order[s] > order[first] for s in sources):
            return False  # every pool goes before the head: each source must exist by then
        if any(s.meta.get(REP).batch_axis != 0 or not _floating(s, chain) for s in sources):
            return False
        if not _shapes_rereadable(chain, sources) or _mutation_from(first, modules):
            return False
        readout = gm.get_submodule(READOUT_NAME)
        if not hasattr(gm, POOL_NAME):
            gm.add_submodule(POOL_NAME, Readout(readout.group, "invariant", "mean"))
        rep = rnode.meta.get(REP)
        out = rep if isinstance(rep, OutputRep) else OutputRep("invariant", None)
        pooled_of: dict[fx.Node, fx.Node] = {}
        # right before the head, not right after each source: ops between them may change a
        # source in place (nothing from the head on may: _mutation_from)
        with gm.graph.inserting_before(first):
            for src in sources:
                pooled_of[src] = gm.graph.call_module(POOL_NAME, (src,))
                new_node_origin(pooled_of[src], self.name)
                set_rep(pooled_of[src], out, "pool")
        for n in chain:
            for src, pooled in pooled_of.items():
                n.replace_input_with(src, pooled)
        _private_shapes(gm, chain, pooled_of)
        for n in chain:
            set_rep(n, out, n.meta.get("equivfx.rule"))
        rnode.replace_all_uses_with(chain[-1])
        gm.graph.erase_node(rnode)
        return True


def _known(node: fx.Node) -> bool:
    """Example inputs gave ``node`` a shape and a dtype."""
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "shape", None) is not None and getattr(meta, "dtype", None) is not None


def _batch_free(node: fx.Node) -> bool:
    """``node`` is a shape value the head re-reads (see ``_private_shapes``), or a value that
    depends on neither a folded value nor a batch size: ``torch.zeros(x.size(0), 1)`` has |G| B
    rows and would not line up with a pooled operand."""
    if isinstance(node.meta.get(REP), BatchSize):
        return True
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if isinstance(n.meta.get(REP), (Folded, BatchSize)):
            return False
        stack.extend(n.all_input_nodes)
    return True


JOINTLY_LINEAR = frozenset({"add", "sub", "cat", "stack"})
"""Rules whose ops are linear in all their tensor inputs together (a product is linear in each
input alone, and is not here); their in-place forms are refused by ``_mutation_from``."""


def _jointly_linear(node: fx.Node, modules) -> bool:
    module = node_module(node, modules)
    rule = lookup(rule_key(node, module))
    return rule is not None and rule.name in JOINTLY_LINEAR


def _mutation_from(first: fx.Node, modules) -> bool:
    """Some node from ``first`` on may write in place. The pool goes right before ``first``; a
    value written after that (the head's source, or any alias of it) would differ between the
    pooled head and the per-slot one, and with ``chunk`` the pools accumulate after each chunk's
    whole per-slot body, so any later write counts."""
    node = first
    while node.op != "output":
        if mutates(node, modules):
            return True
        node = node.next
    return False


def _floating(src: fx.Node, chain: list[fx.Node]) -> bool:
    """The source can be averaged: a floating or complex dtype where example inputs gave one;
    without them, the head must not convert dtypes (a bool or integer source would reach the mean
    only through such a conversion, as in ``fc((b > 0).float())``)."""
    dtypes = [getattr(n.meta.get("tensor_meta"), "dtype", None) for n in (src, *chain)]
    if dtypes[0] is not None:  # the head's values too: a cast to int inside it truncates
        return all(d is None or d.is_floating_point or d.is_complex for d in dtypes)
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


def _shapes_rereadable(chain: list[fx.Node], sources: list[fx.Node]) -> bool:
    """Every shape value the chain uses can be re-read off a pooled value: it is read off a
    source itself (same sample shape), or it is the batch size read off a folded tensor on axis 0
    with as many rows as the sources (which must agree: any pool then gives B)."""
    if any(not _same_rows(s, sources[0]) for s in sources):
        return False
    stack = [a for n in chain for a in _shape_inputs(n)]
    seen: set[fx.Node] = set()
    while stack:
        b = stack.pop()
        if b in seen:
            continue
        seen.add(b)
        t = _read_off(b)
        if t is not None and t not in sources:
            batch = _batch_read(b) and t.meta[REP].batch_axis == 0
            if not batch or not _same_rows(t, sources[0]):
                return False
        elif t is None and any(isinstance(a.meta.get(REP), Folded) for a in b.all_input_nodes):
            return False
        stack.extend(_shape_inputs(b))
    return True


def _same_rows(a: fx.Node, b: fx.Node) -> bool:
    """Folded ``a`` and ``b`` have as many rows (a reshape(-1, C) of tokens folds |G| B T rows,
    and its pooled size is B T, not B): by the example inputs' shapes, or, without them, where
    they are one value or ``a`` is the lift (|G| B rows) and ``b`` is assumed to have |G| B rows
    too (the common ``view(x.size(0), -1)`` head; a source of tokens without example shapes is
    the case this cannot see)."""
    ma, mb = a.meta.get("tensor_meta"), b.meta.get("tensor_meta")
    shape_a, shape_b = getattr(ma, "shape", None), getattr(mb, "shape", None)
    if not shape_a or not shape_b:
        return a is b or (a.op == "call_module" and a.target == LIFT_NAME)
    return shape_a[0] == shape_b[0]


def _private_shapes(gm: fx.GraphModule, chain: list[fx.Node], pooled_of: dict[fx.Node, fx.Node]):
    """Give the moved nodes their own shape values, read off the pooled values (batch B, not
    |G| B).

    Shape values computed for other nodes (``B = x.size(0)`` used before the pool as well) stay as
    they are; the chain gets copies whose reads of a source now read its pool, and whose batch
    sizes read off other folded tensors read the first pool (every pool sits before the head).
    """
    any_pool = next(iter(pooled_of.values()))
    memo: dict[fx.Node, fx.Node] = {}

    def private(b: fx.Node, before: fx.Node) -> fx.Node:
        if b in memo:
            return memo[b]
        t = _read_off(b)
        with gm.graph.inserting_before(before):
            if t is not None and t not in pooled_of:  # the batch size of another folded tensor
                new = gm.graph.call_method("size", (any_pool, 0))
            else:
                new = gm.graph.node_copy(
                    b,
                    lambda a: (
                        pooled_of[a]
                        if a in pooled_of
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
