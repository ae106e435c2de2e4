"""Spec parsing, refusals with helpful messages, and user groups whose actions break the law."""

from __future__ import annotations

import pytest
import torch

from equivfx.errors import ActionLawError, GroupSpecError
from equivfx.groups import FiniteGroup, from_generators, group, permutation


@pytest.mark.parametrize(
    ("spec", "order"),
    [
        ("C1", 1), ("C3", 3), ("C16", 16), ("D1", 2), ("D2", 4), ("D8", 16), ("Shift8", 8),
        ("Rev", 2), ("ShiftRev6", 12), ("Perm4", 24), ("Perm7", 5040), ("Shift8@-3", 8),
        ("Perm5@1", 120), ("D4xShift8@-3", 64), ("  C4 x Rev@-3 ", 8),
    ],
)  # fmt: skip
def test_parse_orders(spec: str, order: int) -> None:
    G = group(spec)
    assert isinstance(G, FiniteGroup) and G.order == order
    assert group(repr(G)) == G


def test_catalogue_groups_are_cached() -> None:
    assert group("D4") is group("D4")
    assert group("Shift8@-1") is group("Shift8")
    assert group("Perm5@-2").spec == "Perm5"


@pytest.mark.parametrize("spec", ["Q8", "", "C0", "C4@-3", "Shift", "Perm4@x", "D4xx", 4, None])
def test_unknown_specs(spec: object) -> None:
    with pytest.raises(GroupSpecError) as info:
        group(spec)  # type: ignore[arg-type]
    msg = str(info.value)
    assert "Fix:" in msg


def test_unknown_spec_message_lists_forms() -> None:
    with pytest.raises(GroupSpecError, match="'Q8'") as info:
        group("Q8")
    assert "Shift{n}" in str(info.value) and "D4xShift8@-3" in str(info.value)
    with pytest.raises(GroupSpecError, match="did you mean '[CD]4'"):
        group("D4xQ4")


def test_perm9_refused_with_shift_suggestion() -> None:
    with pytest.raises(GroupSpecError, match=r"Shift9@-2") as info:
        group("Perm9")
    assert "9!" in str(info.value)
    with pytest.raises(GroupSpecError, match=r"Shift8@1"):
        permutation(8, axis=1)


def _rot90(x: torch.Tensor) -> torch.Tensor:
    return torch.rot90(x, 1, (-2, -1))


def test_user_group_registered_and_round_trips() -> None:
    G = from_generators("MyRot4", {"q": (1, 2, 3, 0)}, {"q": _rot90})
    assert group("MyRot4") is G and group(repr(G)) == G
    assert G.exact and torch.equal(
        G.act("q2", torch.arange(4).reshape(2, 2)), torch.tensor([[3, 2], [1, 0]])
    )
    P = group("MyRot4xShift4@-3")
    assert P.order == 16 and group(repr(P)) == P


def test_user_group_breaking_the_law_names_generator() -> None:
    # Declared of order 4 as a permutation, but acts like an order-3 operation.
    with pytest.raises(ActionLawError, match="'a'") as info:
        from_generators(
            "BadOrder",
            {"a": (1, 2, 3, 0)},
            {"a": lambda x: torch.roll(x, 1, -1)},
            probe=torch.randn(2, 3, dtype=torch.float64),
        )
    msg = str(info.value)
    assert "BadOrder" in msg and "got" in msg
    with pytest.raises(GroupSpecError):
        group("BadOrder")  # not registered


def test_user_group_second_generator_breaks() -> None:
    # Z2 x Z2 declared, but a = roll by 1 and b = flip generate D4 on a length-4 axis.
    with pytest.raises(ActionLawError, match="'b'|'a'"):
        from_generators(
            "BadKlein",
            {"a": (1, 0, 3, 2), "b": (2, 3, 0, 1)},
            {"a": lambda x: torch.roll(x, 1, -1), "b": lambda x: torch.flip(x, (-1,))},
            probe=torch.randn(2, 4, dtype=torch.float64),
        )


def test_user_group_bad_inputs() -> None:
    with pytest.raises(GroupSpecError, match="collides"):
        from_generators("C4", {"r": (1, 2, 3, 0)}, {"r": _rot90})
    with pytest.raises(GroupSpecError, match="collides"):
        from_generators("Perm9", {"r": (1, 2, 3, 0)}, {"r": _rot90})
    with pytest.raises(GroupSpecError, match="exactly the generators"):
        from_generators("Missing", {"a": (1, 0), "b": (0, 1)}, {"a": lambda x: x})
    with pytest.raises(GroupSpecError, match="not a permutation"):
        from_generators("NotPerm", {"a": (1, 1)}, {"a": lambda x: x})
    with pytest.raises(GroupSpecError, match="generator name"):
        from_generators("BadName", {"e": (1, 0)}, {"e": lambda x: x})
    with pytest.raises(GroupSpecError, match="user group name"):
        from_generators("has space", {"a": (1, 0)}, {"a": lambda x: x})


def test_suggestions_ignore_case() -> None:
    with pytest.raises(GroupSpecError, match="did you mean 'C4'"):
        group("c4")
    with pytest.raises(GroupSpecError, match="did you mean 'Perm4'"):
        group("perm4x")
