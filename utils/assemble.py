"""``python -m utils.assemble``: a runnable BERT from the teacher plus retrained blocks and/or merged layers, found by
their metadata (the command of ``utils.cli.commands``; from Python: ``utils.api.assemble``).

    python -m utils.assemble --teacher bert-base-uncased --blocks checkpoints/blocks_h4_d64_mse \\
        --out checkpoints/assembled
"""
from __future__ import annotations

if __name__ == "__main__":  # python -m utils.assemble: stop handlers before the imports below, as in the scripts
    from utils.stops import install_stop_handlers

    install_stop_handlers()

import sys

from .cli.commands import assemble_main as main

if __name__ == "__main__":
    sys.exit(main())
