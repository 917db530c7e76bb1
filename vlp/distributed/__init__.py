"""Cross-rank communication: the one package that calls ``torch.distributed``.

:mod:`vlp.distributed.collectives` holds process groups, the differentiable collectives the losses
use, the trainer's small non-differentiable reductions, and byte counting (all re-exported here).
:mod:`vlp.distributed.sharding` holds FSDP2 (``scaling.strategy: fsdp``: sharding a model, gradient
sync, global-norm clipping) and :mod:`vlp.distributed.sharded_checkpoint` the sharded checkpoint I/O
(``torch.distributed.checkpoint``); import them by their module (they load more of torch).
"""

from vlp.distributed.collectives import *  # noqa: F401,F403  (the public API, as listed there)
from vlp.distributed.collectives import __all__  # noqa: F401
