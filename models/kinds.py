"""The attention kinds: one record per kind of attention a layer (a student unit) can have.

A record says what the kind is, which ``LayerSpec`` fields it reads, the command-line flag that sets its field (the
command line builds its flags and the choices of ``--attention`` from these records), how many key/value heads it
caches per token (for KV-cache sizes and the exporters) and what a spec of that kind must satisfy. Each model family
implements the kinds it supports: its module classes and teacher initialisers are registered with ``implements`` (in
the family's own file, next to the class), so adding a kind is its record (``register``), its module (and
initialiser) in the family file, and its test; nothing else lists the kinds.

Standard library only: this file is copied next to exported models (remote code) as it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Flag:
    """A command-line flag that sets one spec field of a kind (and so selects the kind): ``--kv-heads 4``.
    ``tag``: the field's part of run-folder names (``kv`` -> ``h6_d64_kv1``)."""

    name: str
    field: str
    help: str
    tag: str = ""


@dataclass(frozen=True)
class AttentionKind:
    """One kind of attention.

    ``fields``: the ``LayerSpec`` fields this kind reads besides ``num_heads`` / ``head_dim`` (others must be None).
    ``kv_heads``: key/value heads cached per token by a layer of this kind (0: nothing cached).
    ``check``: what else a spec of this kind must satisfy: a problem (one line) or None.
    ``has_heads``: whether ``num_heads`` / ``head_dim`` mean anything (a kind without q/k/v has none).
    ``has_block``: whether a block of this kind has anything to train on its own (``none`` has not: its units are
    whole layers).
    ``tag``: the kind's part of run-folder names after ``h<heads>_d<head_dim>`` (None: ``_<name>``; a kind with a
    flag: the flag's field).
    """

    name: str
    summary: str
    fields: tuple[str, ...] = ()
    flag: Flag | None = None
    kv_heads: Callable[[Any], int] = lambda spec: spec.num_heads
    check: Callable[[Any], str | None] = lambda spec: None
    has_heads: bool = True
    has_block: bool = True
    tag: str | None = None

    def folder_tag(self, spec: Any) -> str:
        """This kind's part of a run-folder name for ``spec`` (after ``h<heads>_d<head_dim>``)."""
        if self.flag is not None:
            return f"_{self.flag.tag or self.flag.field}{getattr(spec, self.flag.field)}"
        return f"_{self.name}" if self.tag is None else self.tag


KINDS: dict[str, AttentionKind] = {}


def register(kind: AttentionKind) -> AttentionKind:
    if kind.name in KINDS:
        raise ValueError(f"attention kind '{kind.name}' is registered twice")
    KINDS[kind.name] = kind
    return kind


def unregister(name: str, *tables: dict[str, Any]) -> None:
    """Remove kind ``name`` from the registry and from the family ``tables`` that implement it (tests that register
    a kind of their own take it out again)."""
    KINDS.pop(name, None)
    for table in tables:
        table.pop(name, None)


def get_kind(name: str) -> AttentionKind:
    if name not in KINDS:
        raise ValueError(f"unknown attention kind '{name}'; known: {', '.join(KINDS)}")
    return KINDS[name]


def flagged_kind(values: dict[str, Any]) -> str | None:
    """The kind whose flag field is set (not None) in ``values`` (a field -> value mapping), None when none is."""
    named = [k.name for k in KINDS.values() if k.flag is not None and values.get(k.flag.field) is not None]
    if len(named) > 1:
        raise ValueError(f"fields of different attention kinds given together: {', '.join(named)}")
    return named[0] if named else None


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
        return (f"grouped-query attention needs num_kv_heads that divide the query heads: {spec.num_heads} query heads "
                f"are not a multiple of num_kv_heads={kv}")
    return None


register(AttentionKind("mha", "multi-head attention: every query head has its own key/value head", tag=""))
register(AttentionKind(
    "gqa", "grouped-query attention: num_kv_heads key/value heads, each shared by num_heads / num_kv_heads query "
    "heads (num_kv_heads 1: multi-query)", fields=("num_kv_heads",),
    flag=Flag("--kv-heads", "num_kv_heads",
              "grouped-query attention: this many key/value heads, each shared by a group of query heads (must "
              "divide the heads; from the teacher: each new key/value head starts as the mean of its group's)",
              tag="kv"),
    kv_heads=lambda spec: spec.num_kv_heads, check=_gqa_check))
register(AttentionKind(
    "none", "no attention: the layer keeps only its feed-forward part", kv_heads=lambda spec: 0, has_heads=False,
    has_block=False))
register(AttentionKind(
    "linear", "attention replaced by one linear map of the (normalised) hidden state, token by token",
    kv_heads=lambda spec: 0, has_heads=False))
