"""Finite groups as values: elements in slot order, a multiplication table, a bound action.

Every group is built the same way: abstract generators given as permutations of a finite set are
closed by a breadth-first search over the Cayley graph (kept as a :class:`networkx.DiGraph`). The
search gives shortest words and, for user groups, the slot order (shortlex, identity first).
Catalogue factories pass an explicit slot order so that, e.g., C4 is ``[e, r, r2, r3]`` and Dn is
``[e, r, ..., r^(n-1), f, rf, ...]``.

Conventions (DESIGN.md section 1): slot 0 is the identity, named ``"e"``; ``table[i][j]`` is the
index of ``g_i * g_j``; permutations compose as functions, ``(p * q)(i) = p(q(i))``.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import networkx as nx
import torch

from equivfx.errors import GroupLawError, GroupSpecError, explain

if TYPE_CHECKING:
    from equivfx.groups.actions import Action

__all__ = [
    "MAX_ORDER",
    "Closure",
    "Element",
    "FiniteGroup",
    "check_group_laws",
    "closure",
    "compose_permutations",
]

#: The largest group order equivfx builds (the lift costs one forward pass per element).
MAX_ORDER = 10000

Perm = tuple[int, ...]


@dataclass(frozen=True)
class Element:
    """One element of a finite group, identified by its slot index.

    Attributes:
        index: position in the group's slot order (0 is the identity).
        name: readable name, e.g. ``"r2f"`` in D4 or ``"(0 1)"`` in Perm3.

    Example:
        >>> g = Element(2, "r2")
        >>> g, int(g), [10, 11, 12][g]
        (r2, 2, 12)
    """

    index: int
    name: str

    def __index__(self) -> int:
        return self.index

    def __int__(self) -> int:
        return self.index

    def __repr__(self) -> str:
        return self.name


def compose_permutations(p: Perm, q: Perm) -> Perm:
    """Return ``p * q`` as functions: apply ``q`` first, then ``p``.

    Example:
        >>> compose_permutations((1, 2, 0), (1, 0, 2))
        (2, 1, 0)
    """
    return tuple(p[i] for i in q)


@dataclass(frozen=True)
class Closure:
    """The result of :func:`closure`.

    Attributes:
        perms: the elements as permutations, in slot order (identity first).
        right: ``right[i][k]`` is the index of ``g_i * a_k`` for the k-th generator ``a_k``.
        generator_names: the generator names, in the order given.
        generator_indices: the slot index of each generator.
        graph: the Cayley graph, nodes = slot indices, edge ``i -> index(g_i * a)`` labelled
            ``generator=a`` (the first generator reaching it, when two coincide).
    """

    perms: tuple[Perm, ...]
    right: tuple[tuple[int, ...], ...]
    generator_names: tuple[str, ...]
    generator_indices: tuple[int, ...]
    graph: nx.DiGraph


def _check_permutations(generators: Mapping[str, Sequence[int]]) -> dict[str, Perm]:
    gens: dict[str, Perm] = {}
    size = None
    for name, perm in generators.items():
        if not isinstance(name, str) or not name or name == "e":
            raise GroupSpecError(
                explain(
                    "invalid generator name",
                    name,
                    "a non-empty string other than 'e' (which names the identity)",
                    "rename the generator, e.g. 'a' or 'rot'",
                )
            )
        try:
            p = tuple(int(i) for i in perm)
        except (TypeError, ValueError):
            raise GroupSpecError(
                explain(
                    f"generator {name!r} is not a permutation",
                    perm,
                    "a tuple of ints, a rearrangement of range(m)",
                    "give each generator as the images (p[0], ..., p[m-1])",
                )
            ) from None
        if sorted(p) != list(range(len(p))):
            raise GroupSpecError(
                explain(
                    f"generator {name!r} is not a permutation",
                    perm,
                    f"a rearrangement of range({len(p)})",
                    "list every point of the set exactly once",
                )
            )
        if size is not None and len(p) != size:
            raise GroupSpecError(
                explain(
                    f"generator {name!r} permutes a set of another size",
                    len(p),
                    f"{size} points, like the generators before it",
                    "give all generators as permutations of the same range(m)",
                )
            )
        size = len(p)
        gens[name] = p
    return gens


def closure(
    generators: Mapping[str, Sequence[int]],
    *,
    slot_words: Sequence[Sequence[str]] | None = None,
    slot_perms: Sequence[Sequence[int]] | None = None,
    max_order: int = MAX_ORDER,
) -> Closure:
    """Close permutation generators into a group by BFS over the Cayley graph.

    Args:
        generators: name -> permutation of ``range(m)`` (same m for all). At least one.
        slot_words: optional explicit slot order, one word per element (``()`` first). The word
            ``(a, b)`` is the element ``a * b``.
        slot_perms: optional explicit slot order given as permutations (identity first).
        max_order: refuse groups larger than this.

    Returns:
        A :class:`Closure`. Without an explicit order, the slot order is the BFS (shortlex) order.

    Raises:
        GroupSpecError: malformed generators, a group larger than ``max_order``, or an explicit slot
            order that is not exactly the group's elements.

    Example:
        >>> c = closure({"r": (1, 2, 3, 0)})
        >>> len(c.perms), c.generator_indices
        (4, (1,))
    """
    if not generators:
        raise GroupSpecError(
            explain("no generators given", dict(generators), "at least one", "add a generator")
        )
    gens = _check_permutations(generators)
    names = tuple(gens)
    m = len(next(iter(gens.values())))
    identity = tuple(range(m))
    index: dict[Perm, int] = {identity: 0}
    perms: list[Perm] = [identity]
    right: list[list[int]] = []
    queue: deque[int] = deque([0])
    while queue:
        i = queue.popleft()
        row = []
        for a in names:
            q = compose_permutations(perms[i], gens[a])
            j = index.get(q)
            if j is None:
                if len(perms) >= max_order:
                    raise GroupSpecError(
                        explain(
                            "group too large",
                            f"more than {max_order} elements",
                            f"at most {max_order} (the lift costs one pass per element)",
                            "use a subgroup (fewer or smaller generators)",
                        )
                    )
                j = len(perms)
                index[q] = j
                perms.append(q)
                queue.append(j)
            row.append(j)
        right.append(row)

    order = list(range(len(perms)))
    if slot_words is not None or slot_perms is not None:
        if slot_perms is None:
            slot_perms = []
            for word in slot_words:
                p = identity
                for a in word:
                    if a not in gens:
                        raise GroupSpecError(
                            explain("unknown generator in slot order", a, f"one of {names}")
                        )
                    p = compose_permutations(p, gens[a])
                slot_perms.append(p)
        wanted = [tuple(p) for p in slot_perms]
        if len(set(wanted)) != len(wanted) or set(wanted) != set(index) or wanted[0] != identity:
            raise GroupSpecError(
                explain(
                    "explicit slot order does not list the group's elements",
                    f"{len(wanted)} entries",
                    f"each of the {len(perms)} elements once, identity first",
                    "check the slot order against the generators",
                )
            )
        order = [index[p] for p in wanted]
    new_of_old = {old: new for new, old in enumerate(order)}
    perms_sorted = tuple(perms[old] for old in order)
    right_sorted = tuple(tuple(new_of_old[j] for j in right[old]) for old in order)
    graph = nx.DiGraph()
    graph.add_nodes_from(range(len(order)))
    for i, row in enumerate(right_sorted):
        for a, j in zip(names, row, strict=True):
            if not graph.has_edge(i, j):
                graph.add_edge(i, j, generator=a)
    gen_indices = tuple(new_of_old[index[gens[a]]] for a in names)
    return Closure(perms_sorted, right_sorted, names, gen_indices, graph)


def _word_name(word: Sequence[str]) -> str:
    """Name an element by its word, compressing runs: ``('a', 'a', 'b') -> 'a2b'``."""
    if not word:
        return "e"
    runs: list[tuple[str, int]] = []
    for a in word:
        if runs and runs[-1][0] == a:
            runs[-1] = (a, runs[-1][1] + 1)
        else:
            runs.append((a, 1))
    short = all(len(a) == 1 for a, _ in runs)
    if short:
        return "".join(a if k == 1 else f"{a}{k}" for a, k in runs)
    return "*".join(a if k == 1 else f"{a}^{k}" for a, k in runs)


class FiniteGroup:
    """A finite group with a slot order, a multiplication table and a default input action.

    Build groups with the catalogue (``equivfx.groups.group("D4")``, ``cyclic``, ``product`` ...) or
    with :meth:`from_permutations`; the constructor is low level. Groups are immutable and hashable;
    equality is by (spec, table); ``repr`` is the spec, which :func:`equivfx.groups.group` parses
    back.

    Example:
        >>> from equivfx.groups import group
        >>> G = group("C4")
        >>> G.order, G.elements, G.compose("r", "r3")
        (4, (e, r, r2, r3), e)
    """

    def __init__(
        self,
        spec: str,
        cl: Closure,
        names: Sequence[str] | Callable[[int, Perm], str] | None = None,
        action: Action | None = None,
        factors: tuple[FiniteGroup, ...] = (),
    ) -> None:
        """Wrap a :class:`Closure`; prefer :meth:`from_permutations` or the catalogue.

        Args:
            spec: the canonical spec string (``repr``).
            cl: the closed group.
            names: element names in slot order, or ``f(index, perm) -> name``; default: the
                shortest words.
            action: the default input action (bound here); default: trivial.
            factors: for direct products, the factor groups.
        """
        s = object.__setattr__
        s(self, "_spec", spec)
        s(self, "_perms", cl.perms)
        s(self, "_index", {p: i for i, p in enumerate(cl.perms)})
        s(self, "_right", cl.right)
        s(self, "_graph", cl.graph)
        s(self, "_factors", tuple(factors))
        s(self, "_generator_names", cl.generator_names)
        s(self, "_inverse", tuple(self._index[_invert(p)] for p in cl.perms))
        if names is None:
            words = self._words()
            names = [_word_name(words[i]) for i in range(len(cl.perms))]
        elif callable(names):
            names = [names(i, p) for i, p in enumerate(cl.perms)]
        names = tuple(names)
        if len(names) != len(cl.perms) or len(set(names)) != len(names) or names[0] != "e":
            raise GroupSpecError(
                explain(
                    "element names must be unique, one per element, identity named 'e'",
                    names[:8],
                    f"{len(cl.perms)} distinct names starting with 'e'",
                )
            )
        s(self, "_names", names)
        s(self, "_name_index", {n: i for i, n in enumerate(names)})
        s(
            self,
            "_generators",
            tuple(Element(i, names[i]) for i in cl.generator_indices),
        )
        if action is None:
            from equivfx.groups.actions import TrivialAction

            action = TrivialAction()
        s(self, "_action", action.bind(self))

    @classmethod
    def from_permutations(
        cls,
        spec: str,
        generators: Mapping[str, Sequence[int]],
        *,
        action: Action | None = None,
        slot_words: Sequence[Sequence[str]] | None = None,
        slot_perms: Sequence[Sequence[int]] | None = None,
        names: Sequence[str] | Callable[[int, Perm], str] | None = None,
        factors: tuple[FiniteGroup, ...] = (),
    ) -> FiniteGroup:
        """Close permutation generators (see :func:`closure`) and wrap the result.

        Example:
            >>> G = FiniteGroup.from_permutations("Z3", {"a": (1, 2, 0)})
            >>> G.elements
            (e, a, a2)
        """
        cl = closure(generators, slot_words=slot_words, slot_perms=slot_perms)
        return cls(spec, cl, names=names, action=action, factors=factors)

    # ----------------------------------------------------------------------------------- immutabili
    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"FiniteGroup is immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"FiniteGroup is immutable: cannot delete {name!r}")

    def __reduce__(self) -> tuple[Any, ...]:
        from equivfx.groups.catalogue import group

        return (group, (self._spec,))

    # ----------------------------------------------------------------------------------- basic data
    @property
    def spec(self) -> str:
        """The canonical spec string; ``group(G.spec) == G``."""
        return self._spec

    @property
    def order(self) -> int:
        """The number of elements."""
        return len(self._perms)

    @functools.cached_property
    def elements(self) -> tuple[Element, ...]:
        """All elements in slot order, identity first."""
        return tuple(Element(i, n) for i, n in enumerate(self._names))

    @property
    def identity(self) -> Element:
        """The identity element (slot 0, named ``"e"``)."""
        return self.elements[0]

    @property
    def generators(self) -> tuple[Element, ...]:
        """The generators, in the order they were given."""
        return self._generators

    @property
    def generator_names(self) -> tuple[str, ...]:
        """The generator names (the letters of :meth:`word`), in the order given."""
        return self._generator_names

    @property
    def factors(self) -> tuple[FiniteGroup, ...]:
        """For a direct product, its factors; ``()`` otherwise."""
        return self._factors

    @property
    def permutations(self) -> tuple[Perm, ...]:
        """The faithful permutation representation the group was closed from, in slot order."""
        return self._perms

    @property
    def action(self) -> Action:
        """The default input action, bound to this group."""
        return self._action

    @property
    def exact(self) -> bool:
        """Whether the default action is exact (``action.exact``)."""
        return self._action.exact

    def act(self, g: Element | int | str, x: torch.Tensor) -> torch.Tensor:
        """Apply the default action: ``g . x``.

        Example:
            >>> from equivfx.groups import group
            >>> group("C4").act("r", torch.tensor([[1, 2], [3, 4]])).tolist()
            [[2, 4], [1, 3]]
        """
        return self._action.apply(self.element(g), x)

    # ----------------------------------------------------------------------------------- tables
    @functools.cached_property
    def _table_tensor(self) -> torch.Tensor:
        n = self.order
        right = torch.tensor(self._right, dtype=torch.long).reshape(n, -1)
        table = torch.empty((n, n), dtype=torch.long)
        table[:, 0] = torch.arange(n)
        # Columns in BFS order: g_i * g_j = (g_i * g_parent) * a, so col_j = right[col_parent, a].
        label_pos = {a: k for k, a in enumerate(self._generator_names)}
        for u, v in nx.bfs_edges(self._graph, 0):
            a = label_pos[self._graph.edges[u, v]["generator"]]
            table[:, v] = right[table[:, u], a]
        return table

    @functools.cached_property
    def table(self) -> tuple[tuple[int, ...], ...]:
        """``table[i][j]`` is the slot index of ``g_i * g_j``."""
        return tuple(tuple(row) for row in self._table_tensor.tolist())

    @property
    def inverse_table(self) -> tuple[int, ...]:
        """``inverse_table[i]`` is the slot index of ``g_i^-1``."""
        return self._inverse

    # ----------------------------------------------------------------------------------- elements
    def element(self, g: Element | int | str) -> Element:
        """Look an element up by index, name, generator name (e.g. ``"t"`` in Perm4) or Element.

        Raises:
            GroupSpecError: no such element in this group.
        """
        if isinstance(g, str):
            i = self._name_index.get(g)
            if i is None and g in self._generator_names:
                i = self._generators[self._generator_names.index(g)].index
            if i is None:
                raise GroupSpecError(
                    explain(
                        f"{self._spec} has no element named",
                        g,
                        f"one of {list(self._names[:12])}{' ...' if self.order > 12 else ''}",
                        "use G.elements to list the names",
                    )
                )
            return self.elements[i]
        try:
            i = int(g.__index__())
        except (AttributeError, TypeError):
            raise GroupSpecError(
                explain(f"not an element of {self._spec}", g, "an Element, index or name")
            ) from None
        if not 0 <= i < self.order:
            raise GroupSpecError(
                explain(
                    f"element index out of range for {self._spec}",
                    i,
                    f"0 <= index < {self.order}",
                )
            )
        if isinstance(g, Element) and g.name != self._names[i]:
            raise GroupSpecError(
                explain(
                    f"element is not from {self._spec}",
                    g,
                    f"the element at index {i} is named {self._names[i]!r}",
                    "look elements up in the group they belong to",
                )
            )
        return self.elements[i]

    def __getitem__(self, g: Element | int | str) -> Element:
        return self.element(g)

    def __len__(self) -> int:
        return self.order

    def __iter__(self) -> Iterator[Element]:
        return iter(self.elements)

    def __contains__(self, g: object) -> bool:
        if isinstance(g, Element):
            return 0 <= g.index < self.order and self._names[g.index] == g.name
        return False

    def compose(self, a: Element | int | str, b: Element | int | str) -> Element:
        """Return ``a * b``.

        Example:
            >>> from equivfx.groups import group
            >>> D4 = group("D4")
            >>> D4.compose("r", "f"), D4.compose("f", "r")
            (rf, r3f)
        """
        pa = self._perms[self.element(a).index]
        pb = self._perms[self.element(b).index]
        return self.elements[self._index[compose_permutations(pa, pb)]]

    def inverse(self, a: Element | int | str) -> Element:
        """Return ``a^-1``."""
        return self.elements[self._inverse[self.element(a).index]]

    def regular_permutation(self, h: Element | int | str) -> tuple[int, ...]:
        """The slot permutation of the regular action of ``h``: ``perm[j] = index(h^-1 * g_j)``.

        The regular action on a slot axis is then ``(h.s)[..., j] = s[..., perm[j]]``.

        Example:
            >>> from equivfx.groups import group
            >>> group("C4").regular_permutation("r")
            (3, 0, 1, 2)
        """
        hinv = self._perms[self._inverse[self.element(h).index]]
        return tuple(self._index[compose_permutations(hinv, p)] for p in self._perms)

    # ----------------------------------------------------------------------------------- words
    def cayley_graph(self) -> nx.DiGraph:
        """A copy of the Cayley graph: nodes = slot indices, edges ``i -> index(g_i * a)``.

        Each edge carries ``generator=a`` (the generator name).
        """
        return self._graph.copy()

    def _words(self) -> list[tuple[str, ...]]:
        words: list[tuple[str, ...]] = [()] * len(self._perms)
        for u, v in nx.bfs_edges(self._graph, 0):
            words[v] = words[u] + (self._graph.edges[u, v]["generator"],)
        return words

    @functools.cached_property
    def _word_cache(self) -> tuple[tuple[str, ...], ...]:
        return tuple(self._words())

    def word(self, g: Element | int | str) -> tuple[str, ...]:
        """A shortest word in the generators for ``g`` (BFS on the Cayley graph); identity ->
        ``()``.

        The word ``(a, b)`` means ``a * b``.

        Example:
            >>> from equivfx.groups import group
            >>> group("D4").word("r3f")
            ('f', 'r')
        """
        return self._word_cache[self.element(g).index]

    # ----------------------------------------------------------------------------------- dunder
    def __repr__(self) -> str:
        return self._spec

    def __str__(self) -> str:
        return self._spec

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, FiniteGroup):
            return NotImplemented
        return (
            self._spec == other._spec
            and self.order == other.order
            and bool(torch.equal(self._table_tensor, other._table_tensor))
        )

    def __hash__(self) -> int:
        # Consistent with __eq__: equal groups share spec and order (the table may be large).
        return hash((self._spec, self.order))


def _invert(p: Perm) -> Perm:
    inv = [0] * len(p)
    for i, pi in enumerate(p):
        inv[pi] = i
    return tuple(inv)


def check_group_laws(table: Sequence[Sequence[int]]) -> None:
    """Check that a multiplication table defines a group with identity at any slot.

    Checks, in order: closure (square, entries in range), associativity, identity, inverses.

    Args:
        table: ``table[i][j]`` = index of ``g_i * g_j``.

    Raises:
        GroupLawError: naming the first failure (the entry, triple or element at fault).

    Example:
        >>> check_group_laws([[0, 1], [1, 0]])
        >>> check_group_laws([[0, 1], [1, 1]])
        Traceback (most recent call last):
        ...
        equivfx.errors.GroupLawError: element without an inverse: got 1; ...
    """
    rows = [list(r) for r in table]
    n = len(rows)
    if n == 0:
        raise GroupLawError(explain("empty table", table, "at least the identity"))
    for i, row in enumerate(rows):
        if len(row) != n:
            raise GroupLawError(
                explain(
                    f"not closed: row {i} has {len(row)} entries",
                    len(row),
                    f"a square {n}x{n} table",
                )
            )
        for j, v in enumerate(row):
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < n:
                raise GroupLawError(
                    explain(
                        f"not closed: table[{i}][{j}] is not an element",
                        v,
                        f"an index in range({n})",
                        "every product must be one of the elements",
                    )
                )
    t = torch.tensor(rows, dtype=torch.long)
    for a in range(n):
        lhs = t[t[a]]  # [b, c] -> (a*b)*c
        rhs = t[a][t]  # [b, c] -> a*(b*c)
        bad = (lhs != rhs).nonzero()
        if len(bad):
            b, c = (int(v) for v in bad[0])
            raise GroupLawError(
                explain(
                    f"not associative: (g{a}*g{b})*g{c} = g{int(lhs[b, c])} but "
                    f"g{a}*(g{b}*g{c}) = g{int(rhs[b, c])}",
                    (a, b, c),
                    "(a*b)*c == a*(b*c) for every triple",
                    "check the table entries of this triple",
                )
            )
    ar = torch.arange(n)
    ids = [e for e in range(n) if torch.equal(t[e], ar) and torch.equal(t[:, e], ar)]
    if not ids:
        raise GroupLawError(
            explain(
                "no identity element",
                None,
                "an index e with table[e][j] == table[j][e] == j for all j",
                "add the identity (slot 0 by convention)",
            )
        )
    e = ids[0]
    for i in range(n):
        if not bool(((t[i] == e) & (t[:, i] == e)).any()):
            raise GroupLawError(
                explain(
                    "element without an inverse",
                    i,
                    f"some j with table[{i}][j] == table[j][{i}] == {e} (the identity)",
                )
            )
