"""Training objectives: a registry (``base.OBJECTIVES``); importing this package registers them all."""

from vlp.objectives import captioning, contrastive, matching, word_matching  # noqa: F401  (each registers itself)
from vlp.objectives.base import (OBJECTIVES, Objective, ObjectiveOutput, build_objectives,
                                 parse_objectives, register_objective)

__all__ = ["OBJECTIVES", "Objective", "ObjectiveOutput", "build_objectives", "parse_objectives",
           "register_objective"]
