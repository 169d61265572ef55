"""Evaluation: teacher vs student on one seeded [MASK] per sentence (``metrics``) and its report (``report``).
Depends on ``utils.runtime`` and ``models``."""
