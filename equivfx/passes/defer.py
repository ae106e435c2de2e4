"""``defer-lift``: run the ops that commute with the input action once, before the lift.

If op(g . x) = g . op(x) (per the rule table: pointwise ops under permutations of entries,
per-channel
affine maps, 1x1 convolutions under spatial actions, ...), then lifting after the op gives the same
slots, g^-1 . op(x) = op(g^-1 . x), while the op runs on B samples instead of |G| B.

Before::

    x -> equivfx_lift -> normalise -> conv1x1 -> conv3x3 -> ...

After::

    x -> normalise -> conv1x1 -> equivfx_lift -> conv3x3 -> ...

Only a chain of single-input, single-user nodes right after the lift moves, and only while each op's
rule claims commutation with the input action on the shapes seen (so it needs example inputs), or
invariance (a symmetric reduction over every acted axis: sum, mean, amax ...). Past an invariant op,
or once the action fixes the value's shape (a global pool to 1x1), G acts trivially: the lift's
action becomes the trivial one, every later op that treats samples alone moves too, and
``eliminate-dead-slots`` computes a single slot.
A pool whose windows tile the example's grid commutes with rotations there, not on every grid
(MaxPool2d(2) on 7x7 drops a row and a column): where a pass relies on it, a ``TilingCheck`` before
it raises :class:`~equivfx.errors.InputShapeError` on inputs it does not tile.
Dropout is never moved: its masks would be shared across slots in training. Outputs are unchanged up
to float rounding.
"""

from __future__ import annotations

import torch.fx as fx

from equivfx.groups.actions import TrivialAction
from equivfx.meta import REP, Folded, InputRep, set_rep, slot_major
from equivfx.passes.infra import Pass, PassResult, new_node_origin
from equivfx.passes.lift import LIFT_NAME, find_lift
from equivfx.passes.modules import CheckInput, TilingCheck
from equivfx.passes.rules import (
    BatchCtx,
    draws_random,
    lookup,
    node_module,
    rule_key,
    tiling_window,
    training_sensitive,
)

__all__ = [
    "DeferLift",
    "CHECK_NAME",
    "acts_trivially",
    "check_tiling",
    "moves_past",
    "reads_inputs",
]

CHECK_NAME = "equivfx_check_input"


class DeferLift(Pass):
    name = "defer-lift"
    requires = frozenset({REP})
    provides = frozenset({REP})

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        lift = find_lift(gm)
        if lift is None:
            return PassResult(gm, False)
        lift_module = gm.get_submodule(LIFT_NAME)
        action = lift_module.action
        modules = dict(gm.named_modules())
        moved = []
        while len(lift.users) == 1:
            node = next(iter(lift.users))
            how = moves_past(node, lift, action, modules)
            if how is None:
                break
            src = lift.args[0]
            if not moved:  # the input is still checked where the user gives it
                gm.add_submodule(CHECK_NAME, CheckInput(action))
                with gm.graph.inserting_after(src):
                    checked = gm.graph.call_module(CHECK_NAME, (src,))
                new_node_origin(checked, self.name)
                set_rep(checked, src.meta.get(REP), "check-input")
                if "tensor_meta" in src.meta:
                    checked.meta["tensor_meta"] = src.meta["tensor_meta"]
                lift.replace_input_with(src, checked)
                src = checked
            # node now reads what the lift read; the lift reads node's output
            node.replace_input_with(lift, src)
            node.replace_all_uses_with(lift, delete_user_cb=lambda u: u is not lift)
            lift.args = (node,)
            node.append(lift)  # keep topological order: node, then the lift
            if "tensor_meta" in node.meta:  # shapes for the next node's commutation check
                lift.meta["tensor_meta"] = node.meta["tensor_meta"]
            if how == "invariant" or acts_trivially(action, node, modules):
                # every slot past this op holds the same value: G acts trivially from here on
                action = TrivialAction().bind(action.group)
                lift_module.action = action
            set_rep(node, InputRep(action), node.meta.get("equivfx.rule"))
            check_tiling(gm, node, modules, self.name)
            moved.append(node)
        return PassResult(gm, bool(moved))


def moves_past(node: fx.Node, lift: fx.Node, action, modules, numbers=frozenset()) -> str | None:
    """Whether ``node``, which reads the lifted value ``lift`` (or what an op moved before the
    lift made of it), can run before the lift: ``"commutes"`` (op(g.x) = g.op(x) for the
    elements of ``action``'s group), ``"invariant"`` (op(g.x) = op(x)) or None (it cannot, or
    its rule does not say). ``numbers``: operands read off shapes that are the same on every
    slot (the coset lift's sizes of other axes), taken as the numbers they are."""
    if node.op not in ("call_module", "call_function", "call_method"):
        return None
    folded = [a for a in node.all_input_nodes if isinstance(a.meta.get(REP), Folded)]
    if folded != [lift] or list(node.all_input_nodes).count(lift) != 1:
        return None
    if any(reads_inputs(a) for a in node.all_input_nodes if a is not lift and a not in numbers):
        return None  # another input's shape, seen on the example only, may differ at run time
    module = node_module(node, modules)
    if draws_random(node, module):
        return None
    rule = lookup(rule_key(node, module))
    rep = node.meta.get(REP)
    if rule is None or not slot_major(rep):
        return None
    if isinstance(action, TrivialAction):  # any op that treats samples alone commutes
        # ... except batch statistics in training, which would see B samples, not |G| B
        return None if training_sensitive(node, module) else "commutes"
    reps = {a: a.meta.get(REP) for a in node.all_input_nodes}
    ctx = BatchCtx(node=node, reps=reps, module=module)
    try:
        if rule.commutes(ctx, action):
            return "commutes"
        return "invariant" if rule.invariant(ctx, action) else None
    except Exception:  # noqa: BLE001 - a rule that cannot decide does not move the op
        return None


def reads_inputs(node: fx.Node) -> bool:
    """Whether ``node``'s value is computed from a model input (a placeholder): an operand whose
    shape the rule saw on the example only (a mask of shape (1, 1, 1) there, (1, 1, L) at run
    time would not commute with shifts). Parameters, buffers and constants are not."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n.op == "placeholder":
            return True
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return False


def check_tiling(gm: fx.GraphModule, node: fx.Node, modules, origin: str) -> None:
    """Put a :class:`~equivfx.passes.modules.TilingCheck` before ``node`` if it is a pool whose
    commutation with rotations holds only where its windows tile the input (found on the
    example's shape): another input shape must not silently break what a pass relied on."""
    window = tiling_window(node, node_module(node, modules))
    if window is None:
        return
    src = node.args[0]
    i = 0
    while hasattr(gm, f"equivfx_tiles_{i}"):
        i += 1
    gm.add_submodule(f"equivfx_tiles_{i}", TilingCheck(window))
    with gm.graph.inserting_before(node):
        check = gm.graph.call_module(f"equivfx_tiles_{i}", (src,))
    new_node_origin(check, origin)
    set_rep(check, src.meta.get(REP), "tiling-check")
    if "tensor_meta" in src.meta:
        check.meta["tensor_meta"] = src.meta["tensor_meta"]
    node.replace_input_with(src, check)


def acts_trivially(action, node: fx.Node, modules) -> bool:
    """Whether every element fixes every value ``node`` can output, whatever the input's size: an
    adaptive pool to 1 (a 1x1 grid), checked exactly on its output shape. (A fixed-window pool can
    also give 1x1 on the example, but not on larger inputs: it does not count.)"""
    tm = node.meta.get("tensor_meta")
    if tm is None or not hasattr(tm, "shape") or isinstance(action, TrivialAction):
        return False
    size = getattr(node_module(node, modules), "output_size", 0)
    sizes = size if isinstance(size, tuple) else (size,)
    if not all(s == 1 for s in sizes):
        return False
    return len(action.kernel((1, *tuple(tm.shape)[1:]))) == action.group.order
