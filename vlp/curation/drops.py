"""The one exception of a row that curation drops: fetch, image and video stages raise it alike.

A ``DropError`` is never a failure of the run: the stage that catches it turns it into a counted row
of the drop ledger with ``reason`` (a short stable name, counted in ``_stats.json``) and ``detail``
(what a person needs to see why). Anything else a stage raises is a bug, caught per row as
``internal_error``.
"""

from __future__ import annotations


class DropError(Exception):
    """A row that cannot be used; ``reason`` is the drop reason counted in the stats."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
