"""Planning: the per-layer sensitivity map (``sensitivity``), the planner over it (``planner``), and the students
built from plans (``students``). Depends on ``utils.session``, ``utils.training``, ``utils.evaluation``."""
