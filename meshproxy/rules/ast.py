"""The rule AST: matcher calls combined with and/or/not. Immutable, built once per rule."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Call:
    name: str  # canonical matcher name, e.g. "PathPrefix"
    args: tuple[str, ...]
    pos: int  # column (0-based) of the name in the rule text


@dataclass(frozen=True, slots=True)
class And:
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class Or:
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class Not:
    operand: Node


Node = Call | And | Or | Not


def calls(node: Node) -> list[Call]:
    """Every matcher call in the tree, left to right."""
    if isinstance(node, Call):
        return [node]
    if isinstance(node, Not):
        return calls(node.operand)
    return calls(node.left) + calls(node.right)
