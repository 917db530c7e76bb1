"""Training objectives: a registry (``base.OBJECTIVES``); importing this package registers them all."""

# importing each module registers its objective
from vlp.objectives import captioning, contrastive, mae, matching, mlm, word_matching  # noqa: F401
from vlp.objectives.base import (OBJECTIVES, Objective, ObjectiveOutput, build_objectives,
                                 parse_objectives, register_objective)

__all__ = ["OBJECTIVES", "Objective", "ObjectiveOutput", "build_objectives", "parse_objectives",
           "register_objective"]
