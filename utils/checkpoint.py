"""``python -m utils.checkpoint rehash DIR``: record the sha256 of weights you vouch for (the command of
``utils.cli.commands``; the checkpoint format itself is ``utils.storage.checkpoint``)."""
from __future__ import annotations

from .cli.commands import checkpoint_main as main

if __name__ == "__main__":
    raise SystemExit(main())
