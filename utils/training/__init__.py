"""Training: the one loop (``loop``), the distillation tasks it runs (``tasks``) with their losses (``losses``), the
units they train (``units``: shapes, initialisation from the teacher, metadata) and students built from trained
units (``students``). Depends on ``utils.data``, ``utils.storage`` and ``models``."""
