"""Pure batch selection: which queued items form the next forward pass.

The oldest item is always in the next batch (nothing starves). Around it, items of similar length
are packed while the padded size `longest * count` stays within the token budget, so little compute
is spent on padding. Only the oldest `lookahead` items are considered, which bounds the cost of a
decision when the queue is long.
"""

from __future__ import annotations

from collections.abc import Sequence


def select_batch(lengths: Sequence[int], max_batch_tokens: int, max_batch_requests: int | None,
                 lookahead: int = 512) -> list[int]:
    """Return positions (into `lengths`, in queue order) of the items to run next.

    `lengths[0]` is the oldest item. An item longer than the whole budget runs alone.
    """
    if not lengths:
        return []
    limit = max_batch_requests or len(lengths)
    window = min(len(lengths), lookahead)
    order = sorted(range(window), key=lambda position: (lengths[position], position))
    anchor = order.index(0)
    low = high = anchor
    longest = lengths[0]

    def fits(count: int, longest_length: int) -> bool:
        return count <= limit and count * longest_length <= max_batch_tokens

    while True:
        count = high - low + 1
        grown = False
        # Shorter neighbours never raise the padded width: take them first.
        if low > 0 and fits(count + 1, longest):
            low -= 1
            grown = True
        elif high + 1 < window and fits(count + 1, max(longest, lengths[order[high + 1]])):
            high += 1
            longest = max(longest, lengths[order[high]])
            grown = True
        if not grown:
            break
    return sorted(order[low:high + 1])
