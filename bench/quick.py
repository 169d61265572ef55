"""``--quick`` for every benchmark: the same run, on other defaults (tiny shapes, few steps), in seconds.

A quick run takes the code path of the real one and changes only sizes, so that a test can run each benchmark
(tests/benchmarks/test_bench_quick.py) and a refactor that breaks one fails there. Flags given explicitly still win
over the quick defaults.
"""
from __future__ import annotations

import argparse
import copy
from typing import Any


def add_quick(parser: argparse.ArgumentParser, defaults: dict[str, Any], what: str) -> None:
    """Add ``--quick`` to ``parser``: when it is given, ``defaults`` (dest -> value) replace the parser's own
    defaults for that parse; ``what`` says in the help what the quick run is."""
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run in seconds, the same code path on other defaults: {what}")
    plain = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        ns, rest = plain(args, copy.copy(namespace))  # a first look, to see whether --quick is among them
        if not ns.quick:
            return plain(args, namespace)
        before = {k: parser.get_default(k) for k in defaults}
        parser.set_defaults(**defaults)
        try:
            return plain(args, namespace)
        finally:
            parser.set_defaults(**before)

    parser.parse_known_args = parse_known_args  # parse_args calls it: one parse, quick defaults where asked
