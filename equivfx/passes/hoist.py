"""``hoist-projection``: with the mean readout, pool the slots before the trailing affine layers.

The mean over slots commutes with affine maps, mean_g(W s_g + b) = W mean_g(s_g) + b, so the head of
the network (flatten, linear layers, reshapes) runs once on the pooled value instead of |G| times.

Before::

    feat -> flatten -> fc -> equivfx_readout(mean) -> output        (fc runs on |G| B rows)

After::

    feat -> equivfx_pool -> flatten -> fc -> output                 (fc runs on B rows)

Only a chain of affine, slot-wise nodes with one batch-carrying input and one user each is moved;
mixing layers, dropout (its masks differ per slot in training) and ops with batch statistics stop
the chain. Outputs are unchanged up to float rounding.
"""

from __future__ import annotations

import torch.fx as fx

from equivfx.meta import REP, BatchSize, Folded, OutputRep, set_rep
from equivfx.passes.infra import Pass, PassResult, new_node_origin
from equivfx.passes.modules import Readout
from equivfx.passes.projection import READOUT_NAME
from equivfx.passes.rules import RANDOM_MODULES, lookup, rule_key

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
        if isinstance(module, RANDOM_MODULES):
            return False
        rule = lookup(rule_key(node, module))
        rep = node.meta.get(REP)
        return bool(
            rule is not None
            and rule.linear
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
        if src.meta.get(REP).batch_axis != 0:
            return False
        readout = gm.get_submodule(READOUT_NAME)
        if not hasattr(gm, POOL_NAME):
            gm.add_submodule(POOL_NAME, Readout(readout.group, "invariant", "mean"))
        rep = rnode.meta.get(REP)
        with gm.graph.inserting_after(src):
            pooled = gm.graph.call_module(POOL_NAME, (src,))
        new_node_origin(pooled, self.name)
        set_rep(pooled, rep if isinstance(rep, OutputRep) else OutputRep("invariant", None), "pool")
        first.replace_input_with(src, pooled)
        members = set(chain) | {pooled}

        def only_feeds_chain(n: fx.Node) -> bool:  # a shape value used by the moved nodes alone
            return isinstance(n.meta.get(REP), BatchSize) and all(
                u in members or only_feeds_chain(u) for u in n.users
            )

        # batch sizes read off the folded source now read the pooled value
        for user in list(src.users):
            if user is not pooled and user not in members and only_feeds_chain(user):
                user.replace_input_with(src, pooled)
        for n in chain:
            set_rep(n, pooled.meta[REP], n.meta.get("equivfx.rule"))
        rnode.replace_all_uses_with(chain[-1])
        gm.graph.erase_node(rnode)
        return True
