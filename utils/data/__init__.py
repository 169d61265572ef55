"""Data, the lowest level above ``utils.runtime``: text and its splits (``text``), tokenised sentences and batches
(``batches``), training-time masking (``masking``). Depends on nothing else in ``utils``."""
