"""vlp, the library: shard format and readers, curation transforms, models, losses, objectives,
evaluation and the training loop, in plain PyTorch, NumPy and Arrow. It never imports the application
(``pipelines/``: the Ray Data jobs, the Ray Train launcher, the ``vlp`` command).

The public surface is ``vlp.api``, re-exported here lazily (``vlp.load_config``, ``vlp.ShardFolder``,
``vlp.load_trained_model``, ...): ``import vlp`` and ``import vlp.config`` stay cheap, and torch is
loaded only when a name that needs it is used.
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    api = importlib.import_module("vlp.api")
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'vlp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + importlib.import_module("vlp.api").__all__)
