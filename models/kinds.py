"""The attention kinds: one record per kind of attention a layer (a student unit) can have.

A record says what the kind is, which ``LayerSpec`` fields it reads, the command-line flag that asks for it, how many
key/value heads it caches per token (for KV-cache sizes and the exporters) and what a spec of that kind must satisfy.
Each model family implements the kinds it supports: its module classes and teacher initialisers are registered with
``implements`` (in the family's own file, next to the class), so adding a kind is its record here, its module (and
initialiser) in the family file, and its test; nothing else lists the kinds.

Standard library only: this file is copied next to exported models (remote code) as it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Flag:
    """A command-line flag that sets one spec field of a kind (and so selects the kind): ``--kv-heads 4``."""

    name: str
    field: str
    help: str


@dataclass(frozen=True)
class AttentionKind:
    """One kind of attention.

    ``fields``: the ``LayerSpec`` fields this kind reads besides ``num_heads`` / ``head_dim`` (others must be None).
    ``kv_heads``: key/value heads cached per token by a layer of this kind (0: nothing cached).
    ``check``: what else a spec of this kind must satisfy: a problem (one line) or None.
    ``has_heads``: whether ``num_heads`` / ``head_dim`` mean anything (a kind without q/k/v has none).
    """

    name: str
    summary: str
    fields: tuple[str, ...] = ()
    flag: Flag | None = None
    kv_heads: Callable[[Any], int] = lambda spec: spec.num_heads
    check: Callable[[Any], str | None] = lambda spec: None
    has_heads: bool = True


KINDS: dict[str, AttentionKind] = {}


def register(kind: AttentionKind) -> AttentionKind:
    if kind.name in KINDS:
        raise ValueError(f"attention kind '{kind.name}' is registered twice")
    KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> AttentionKind:
    if name not in KINDS:
        raise ValueError(f"unknown attention kind '{name}'; known: {', '.join(KINDS)}")
    return KINDS[name]


def implements(table: dict[str, Any], name: str) -> Callable[[Any], Any]:
    """Decorator: put the decorated class or function into a family's ``table`` under kind ``name``."""
    get_kind(name)

    def put(obj: Any) -> Any:
        if name in table:
            raise ValueError(f"attention kind '{name}' is implemented twice in one table")
        table[name] = obj
        return obj
    return put


def _gqa_check(spec: Any) -> str | None:
    kv = spec.num_kv_heads
    if not (isinstance(kv, int) and kv > 0 and spec.num_heads % kv == 0):
        return (f"grouped-query attention needs num_kv_heads that divide the {spec.num_heads} heads, got "
                f"num_kv_heads={kv}")
    return None


register(AttentionKind("mha", "multi-head attention: every query head has its own key/value head"))
register(AttentionKind(
    "gqa", "grouped-query attention: num_kv_heads key/value heads, each shared by num_heads / num_kv_heads query "
    "heads (num_kv_heads 1: multi-query)", fields=("num_kv_heads",),
    flag=Flag("--kv-heads", "num_kv_heads",
              "grouped-query attention: this many key/value heads, each shared by a group of query heads (must "
              "divide the heads; from the teacher: each new key/value head starts as the mean of its group's)"),
    kv_heads=lambda spec: spec.num_kv_heads, check=_gqa_check))
register(AttentionKind(
    "none", "no attention: the layer keeps only its feed-forward part", kv_heads=lambda spec: 0, has_heads=False))
register(AttentionKind(
    "linear", "attention replaced by one linear map of the (normalised) hidden state, token by token",
    kv_heads=lambda spec: 0, has_heads=False))
