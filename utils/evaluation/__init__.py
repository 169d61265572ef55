"""Evaluation: teacher vs student on one seeded [MASK] per sentence, or on every next token of a decoder's windows
(``metrics``, per token with ``token_scores``), its report (``report``), speed (``speed``) and paired tests of two
models on the same items (``stats``). Depends on ``utils.runtime`` and ``models``."""
