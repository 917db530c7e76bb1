"""Cross-rank communication: the one package that calls ``torch.distributed``.

:mod:`vlp.distributed.collectives` holds process groups, the differentiable collectives the losses
use, the trainer's small non-differentiable reductions, and byte counting (all re-exported here).
"""

from vlp.distributed.collectives import *  # noqa: F401,F403  (the public API, as listed there)
from vlp.distributed.collectives import __all__  # noqa: F401
