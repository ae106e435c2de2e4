"""Pass infrastructure: a pass is a small object; a pipeline is an ordered list checked when built.

A pass has a kebab-case ``name`` (shown by ``equivfx inspect``), the metadata keys it ``requires``
and
``provides``, and ``__call__(gm) -> PassResult`` (torch.fx's own result type). :class:`Pipeline`
checks,
when it is built, that each pass's requirements are provided by an earlier pass (or by the input),
and
after each pass in debug mode it lints the graph and checks the equivfx metadata.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from equivfx.errors import PipelineError, explain

__all__ = ["Pass", "Pipeline", "PassResult", "new_node_origin", "nodes_after"]

log = logging.getLogger(__name__)


class Pass:
    """Base class of equivfx passes.

    Subclasses set ``name``, ``requires`` and ``provides`` and implement ``__call__``. Options live
    in a
    frozen dataclass given to ``__init__``; a pass keeps no other state between calls.
    """

    name: str = "pass"
    requires: frozenset[str] = frozenset()
    provides: frozenset[str] = frozenset()

    def __call__(self, gm: fx.GraphModule) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


def new_node_origin(node: fx.Node, pass_name: str) -> fx.Node:
    """Record on ``node`` that pass ``pass_name`` created it (``node.meta['equivfx.origin']``)."""
    from equivfx.meta import ORIGIN

    node.meta[ORIGIN] = pass_name
    return node


def nodes_after(node: fx.Node):
    """The nodes after ``node`` in its graph's order, the output last."""
    node = node.next
    while node.op != "root":
        yield node
        node = node.next


@dataclass(frozen=True)
class Pipeline:
    """An ordered list of passes, validated when built.

    Args:
        passes: the passes, in order.
        initial: metadata keys present before the first pass runs.
        check: lint the graph and check metadata after every pass (tests turn this on).

    Raises:
        PipelineError: if a pass requires a key that neither ``initial`` nor an earlier pass
        provides.
    """

    passes: tuple[Pass, ...]
    initial: frozenset[str] = frozenset()
    check: bool = False

    def __init__(self, passes: Iterable[Pass], initial: Iterable[str] = (), check: bool = False):
        object.__setattr__(self, "passes", tuple(passes))
        object.__setattr__(self, "initial", frozenset(initial))
        object.__setattr__(self, "check", check)
        have = set(self.initial)
        for p in self.passes:
            missing = set(p.requires) - have
            if missing:
                order = [q.name for q in self.passes]
                raise PipelineError(
                    explain(
                        f"pass {p.name!r} requires metadata no earlier pass provides",
                        sorted(missing),
                        f"one of the passes before it in {order} to provide them",
                        "reorder the pipeline or add the analysis pass that provides them",
                    )
                )
            have |= set(p.provides)

    @property
    def names(self) -> Sequence[str]:
        return [p.name for p in self.passes]

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for p in self.passes:
            log.debug("equivfx: running pass %s", p.name)
            result = p(gm)
            gm = result.graph_module
            modified |= result.modified
            if result.modified:
                gm.graph.lint()
            if self.check:
                gm.graph.lint()
                from equivfx.meta import check_meta

                if "equivfx.rep" in p.provides or "equivfx.rep" in self.initial:
                    check_meta(gm)
        if modified:  # once: passes read the graph, not the code (on 1,286 nodes, 25 ms each)
            gm.recompile()
        return PassResult(gm, modified)
