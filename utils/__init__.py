"""The library, in parts that depend only on the parts listed before them (tests/test_structure.py checks it):

errors, runtime, stops  settings errors; device, seeding and the distributed facts; stops by signal
data/                   text and splits (DataConfig), tokenised sentences / token windows and batches, masking
storage/                the checkpoint format and schema, locks, the teacher feature cache, exports
session                 a loaded teacher with its tokenizer and the data settings (SessionConfig, start)
training/               the one training loop, the distillation tasks and losses, units, students from checkpoints
evaluation/             teacher vs student (metrics), the report, speed, paired tests (stats)
planning/               the sensitivity map, the planner, planned students
api                     the Python API: what the scripts do, as functions
cli/                    the command-line layer (flags, flags to settings, exit codes); assemble, checkpoint: the
                        ``python -m utils.assemble`` and ``python -m utils.checkpoint rehash`` commands
"""
