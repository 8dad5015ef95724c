"""What became of a webhook delivery (or a poll's answer): the `outcome` its stored row keeps."""

from __future__ import annotations

import enum


class DeliveryOutcome(enum.StrEnum):
    FILED = "filed"  # filed against the live subscription of its package
    ORPHAN = "orphan"  # its package had no live subscription: filed when one is created
    DUPLICATE = "duplicate"  # a copy of content stored already: says nothing new
    REFUSED = "refused"  # not acknowledged (`refusal` says why), never filed


# An original is the first delivery of its content (within its week): filed or an orphan. Only
# originals are filed, or replayed; the unique index on content holds them alone.
ORIGINAL_OUTCOMES = (DeliveryOutcome.FILED, DeliveryOutcome.ORPHAN)
