"""Group laws, slot order, round trips and equality for catalogue, product and user groups."""

from __future__ import annotations

import pickle

import networkx as nx
import pytest
import torch

from equivfx.errors import GroupLawError, GroupSpecError
from equivfx.groups import (
    Element,
    FiniteGroup,
    check_group_laws,
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

CATALOGUE = [
    "C1", "C2", "C3", "C4", "C8", "D1", "D2", "D4", "D8",
    "Shift8", "Rev", "ShiftRev6", "Perm4", "Perm1", "Perm2",
    "Shift8@-3", "Perm5@1", "Rev@-2",
]  # fmt: skip
PRODUCTS = ["D4xShift8@-3", "C4xRev@-3", "C2xShift4@-3xPerm3@0"]


def _user_group() -> FiniteGroup:
    # Z4 x Z2 acting by rolling the last axis and negating.
    return from_generators(
        "UserZ4Z2",
        {"a": (1, 2, 3, 0, 5, 6, 7, 4), "b": (4, 5, 6, 7, 0, 1, 2, 3)},
        {"a": lambda x: torch.roll(x, 1, -1), "b": lambda x: -x},
        probe=torch.randn(2, 4, dtype=torch.float64),
    )


def all_groups() -> list[FiniteGroup]:
    return [group(s) for s in CATALOGUE + PRODUCTS] + [_user_group()]


@pytest.mark.parametrize("G", all_groups(), ids=str)
def test_group_laws_from_table(G: FiniteGroup) -> None:
    t = G.table
    n = G.order
    assert len(t) == n and all(len(r) == n for r in t)
    check_group_laws(t)
    for a in range(n):  # brute-force associativity, identity and inverses
        assert t[0][a] == a and t[a][0] == a
        assert t[a][G.inverse_table[a]] == 0 and t[G.inverse_table[a]][a] == 0
        for b in range(n):
            for c in range(n):
                assert t[t[a][b]][c] == t[a][t[b][c]]
    assert G.identity == G.elements[0] and G.identity.name == "e"
    assert [g.index for g in G.elements] == list(range(n))
    assert len({g.name for g in G.elements}) == n
    assert len(G) == n and list(G) == list(G.elements)


@pytest.mark.parametrize("G", all_groups(), ids=str)
def test_compose_inverse_word_match_table(G: FiniteGroup) -> None:
    for a in G.elements:
        assert G.inverse(a) == G.elements[G.inverse_table[a.index]]
        for b in G.elements[:10]:
            assert G.compose(a, b).index == G.table[a.index][b.index]
        # A word multiplies back to its element, and is no longer than the BFS distance.
        w = G.word(a)
        prod = G.identity
        for letter in w:
            prod = G.compose(prod, G.generators[G.generator_names.index(letter)])
        assert prod == a
        assert len(w) == nx.shortest_path_length(G.cayley_graph(), 0, a.index)
    assert G.word(G.identity) == ()


@pytest.mark.parametrize("G", all_groups(), ids=str)
def test_repr_round_trip_and_equality(G: FiniteGroup) -> None:
    H = group(repr(G))
    assert H == G and hash(H) == hash(G)
    assert str(G) == repr(G) == G.spec
    assert group(G) is G
    assert pickle.loads(pickle.dumps(G)) == G


def test_spec_whitespace_and_equality() -> None:
    assert group(" D4 x Shift8 @ -3 ") == group("D4xShift8@-3")
    assert group("C4") != group("Shift4")  # same table, other spec
    assert group("C4") != group("D4")
    assert product("C4", "Rev@-3") == group("C4xRev@-3")
    assert product(product("C2", "Rev@-3"), "Shift4@-4") == group("C2xRev@-3xShift4@-4")
    assert {group("C4"), group("C4"), group("D4")} == {cyclic(4), dihedral(4)}
    assert repr(shift(8, axis=-1)) == "Shift8" and repr(shift(8, axis=-3)) == "Shift8@-3"
    assert repr(permutation(5, axis=-2)) == "Perm5" and repr(reversal(-1)) == "Rev"
    assert repr(shift_reversal(6)) == "ShiftRev6"


def test_groups_are_immutable() -> None:
    G = group("C4")
    with pytest.raises(AttributeError):
        G.order = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        G.elements[0].index = 3  # type: ignore[misc]


def test_slot_orders_and_names() -> None:
    assert [g.name for g in group("C4")] == ["e", "r", "r2", "r3"]
    assert [g.name for g in group("D4")] == ["e", "r", "r2", "r3", "f", "rf", "r2f", "r3f"]
    assert [g.name for g in group("Shift4")] == ["e", "s", "s2", "s3"]
    assert [g.name for g in group("ShiftRev3")] == ["e", "s", "s2", "v", "sv", "s2v"]
    assert [g.name for g in group("Perm3")][:3] == ["e", "(0 1)", "(0 1 2)"]
    assert group("D4xShift8@-3")[9].name == "(r, s)"
    assert group("D4").generator_names == ("r", "f")
    assert group("Perm4").generator_names == ("t", "c")
    D4 = group("D4")
    for k in range(4):
        for m in range(2):
            g = D4[k + 4 * m]
            # index k + n*m is r^k f^m
            expected = D4.identity
            for _ in range(k):
                expected = D4.compose(expected, "r")
            if m:
                expected = D4.compose(expected, "f")
            assert g == expected
    assert D4.compose("f", "r") == D4["r3f"]  # f r = r^-1 f


def test_element_behaves_as_index() -> None:
    G = group("C4")
    g = G["r2"]
    assert isinstance(g, Element) and repr(g) == "r2"
    assert torch.arange(10, 14)[g] == 12
    assert G.element(2) is G.element("r2") is G[g]
    with pytest.raises(GroupSpecError, match="no element named"):
        G.element("f")
    with pytest.raises(GroupSpecError, match="out of range"):
        G.element(4)


def test_regular_permutation_pinned() -> None:
    C4 = group("C4")
    assert C4.regular_permutation("r") == (3, 0, 1, 2)
    assert C4.regular_permutation("e") == (0, 1, 2, 3)
    D4 = group("D4")
    for h in D4:
        perm = D4.regular_permutation(h)
        hinv = D4.inverse(h)
        assert perm == tuple(D4.compose(hinv, g).index for g in D4)


def test_cayley_graph() -> None:
    G = group("D4")
    graph = G.cayley_graph()
    assert isinstance(graph, nx.DiGraph)
    assert set(graph.nodes) == set(range(8))
    for i, j, data in graph.edges(data=True):
        assert G.compose(i, data["generator"]).index == j
    graph.add_node(99)  # a copy: the group is unchanged
    assert 99 not in G.cayley_graph()


def test_user_group_bfs_slot_order() -> None:
    G = _user_group()
    assert G.order == 8
    assert [g.name for g in G][:4] == ["e", "a", "b", "a2"]
    assert group("UserZ4Z2") is G


def test_from_table_builds_group() -> None:
    # Z3 given by its table.
    G = from_table(
        "TableZ3",
        [[0, 1, 2], [1, 2, 0], [2, 0, 1]],
        {"g": 1},
        {"g": lambda x: torch.roll(x, 1, -1)},
        probe=torch.randn(2, 3, dtype=torch.float64),
    )
    assert G.table == ((0, 1, 2), (1, 2, 0), (2, 0, 1))
    assert group("TableZ3") == G
    assert G.compose("g", "g") == G[2]


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ([[0, 1], [1, 2]], "not closed"),
        ([[0, 1, 2], [1, 0, 0], [2, 0, 1]], "not associative"),
        ([[1, 0], [0, 0]], "not associative|identity"),
        ([[0, 1, 2], [1, 1, 1], [2, 1, 2]], "inverse"),
    ],
)
def test_check_group_laws_rejects(table: list[list[int]], match: str) -> None:
    with pytest.raises(GroupLawError, match=match):
        check_group_laws(table)


def test_non_associative_table_in_from_table() -> None:
    # A Latin square with identity 0 that is not associative (a loop, not a group).
    table = [
        [0, 1, 2, 3, 4],
        [1, 0, 3, 4, 2],
        [2, 4, 0, 1, 3],
        [3, 2, 4, 0, 1],
        [4, 3, 1, 2, 0],
    ]
    with pytest.raises(GroupLawError, match="not associative") as info:
        from_table("Loop5", table, {"a": 1}, {"a": lambda x: x})
    assert "(g" in str(info.value)  # the offending triple and both products are named
    with pytest.raises(GroupSpecError):
        group("Loop5")  # not registered
