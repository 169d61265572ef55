"""Storage: the checkpoint format and its schema (``checkpoint``), unit and cache locks (``lock``), the teacher feature
cache (``features``), exports for use outside this repository (``export``). Depends on ``utils.data`` and ``models``."""
