"""A pipeline's steps as a directed acyclic graph, pure: the order they can run in, the cycle that forbids one,
and the steps downstream of some. A graph maps each node to the nodes it needs (its edges point at what must
come first); every node named in an edge is a key of the graph (``unknown`` finds the ones that are not).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

Graph = Mapping[str, Iterable[str]]


class CycleError(ValueError):
    """The graph has a cycle: ``path`` walks it, from a node back to the same node (``[a, b, a]``)."""

    def __init__(self, path: list[str]) -> None:
        super().__init__(" -> ".join(path))
        self.path = path


def unknown(graph: Graph) -> list[tuple[str, str]]:
    """(node, needed) for every edge to a node the graph does not have, in the graph's order."""
    return [(node, need) for node, needs in graph.items() for need in needs if need not in graph]


def find_cycle(graph: Graph) -> list[str] | None:
    """A cycle of the graph as a closed path (its first node again at its end), or None when it has none.

    Depth first in the graph's order, so the same graph always reports the same cycle."""
    done: set[str] = set()
    for root in graph:
        if root in done:
            continue
        # The path from the root to the node being explored, each with what is left of its edges.
        path: list[str] = [root]
        on_path: set[str] = {root}
        stack = [iter(list(dict.fromkeys(graph[root])))]
        while stack:
            need = next(stack[-1], None)
            if need is None:
                stack.pop()
                node = path.pop()
                on_path.discard(node)
                done.add(node)
                continue
            if need in on_path:
                return path[path.index(need):] + [need]
            if need in done or need not in graph:
                continue
            path.append(need)
            on_path.add(need)
            stack.append(iter(list(dict.fromkeys(graph[need]))))
    return None


def topological_order(graph: Graph) -> list[str]:
    """Every node after all it needs; otherwise in the graph's order (a list already in order stays as it is).
    Raises ``CycleError`` when there is none. Edges to unknown nodes are ignored."""
    cycle = find_cycle(graph)
    if cycle is not None:
        raise CycleError(cycle)
    order: list[str] = []
    placed: set[str] = set()

    def place(node: str) -> None:
        # Iterative post-order: a node goes in once everything it needs has.
        stack = [(node, iter(list(graph[node])))]
        while stack:
            current, needs = stack[-1]
            need = next(needs, None)
            if need is None:
                stack.pop()
                if current not in placed:
                    placed.add(current)
                    order.append(current)
            elif need in graph and need not in placed:
                stack.append((need, iter(list(graph[need]))))

    for node in graph:
        if node not in placed:
            place(node)
    return order


def downstream(graph: Graph, roots: Iterable[str]) -> set[str]:
    """The roots and every node that needs one of them, directly or through others."""
    needed_by: dict[str, list[str]] = {node: [] for node in graph}
    for node, needs in graph.items():
        for need in needs:
            needed_by.setdefault(need, []).append(node)
    found: set[str] = set()
    todo = list(roots)
    while todo:
        node = todo.pop()
        if node in found:
            continue
        found.add(node)
        todo.extend(needed_by.get(node, ()))
    return found


def upstream(graph: Graph, node: str) -> set[str]:
    """Everything ``node`` needs, directly or through others (not the node itself, unless on a cycle)."""
    found: set[str] = set()
    todo = list(graph.get(node, ()))
    while todo:
        need = todo.pop()
        if need in found:
            continue
        found.add(need)
        todo.extend(graph.get(need, ()))
    return found
