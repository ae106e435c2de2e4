"""Finite groups and their actions on tensors: pure algebra, no tracing (never imports torch.fx).

Example:
    >>> from equivfx.groups import group
    >>> G = group("D4")
    >>> G.order, G.generators, G.compose("r", "f")
    (8, (r, f), rf)
"""

from equivfx.groups.actions import (
    Action,
    CallableAction,
    PermuteAction,
    ProductAction,
    RegularAction,
    ReverseAction,
    RollAction,
    RotFlipAction,
    ShiftReverseAction,
    TrivialAction,
    WordAction,
    check_action_law,
)
from equivfx.groups.catalogue import (
    VALID_SPECS,
    cyclic,
    dihedral,
    from_generators,
    from_table,
    group,
    permutation,
    product,
    reversal,
    shift,
    shift_reversal,
)
from equivfx.groups.finite import (
    MAX_ORDER,
    Closure,
    Element,
    FiniteGroup,
    check_group_laws,
    closure,
    compose_permutations,
)

__all__ = [
    "MAX_ORDER",
    "VALID_SPECS",
    "Action",
    "CallableAction",
    "Closure",
    "Element",
    "FiniteGroup",
    "PermuteAction",
    "ProductAction",
    "RegularAction",
    "ReverseAction",
    "RollAction",
    "RotFlipAction",
    "ShiftReverseAction",
    "TrivialAction",
    "WordAction",
    "check_action_law",
    "check_group_laws",
    "closure",
    "compose_permutations",
    "cyclic",
    "dihedral",
    "from_generators",
    "from_table",
    "group",
    "permutation",
    "product",
    "reversal",
    "shift",
    "shift_reversal",
]
