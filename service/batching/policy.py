"""Pure batch selection: which queued items form the next forward pass.

The oldest request goes first: its items are taken before anyone else's (shortest first, as many as
fit), because a request is answered only when its last item is done; spreading one request's items
over many passes delays it by every pass in between. Measured before this rule: eight clients
reranking 20 documents each saw one request's documents spread over up to eight passes, and a p90
latency more than twice the median.

Room left in the batch is filled with other queued items of similar length, closest in length first,
shorter ones (which do not widen the padded batch) before longer ones, while the padded size
`longest * count` stays within the token budget; so little compute is spent on padding. Only the
oldest `lookahead` items are considered, which bounds the cost of a decision when the queue is long.
"""

from __future__ import annotations

from collections.abc import Sequence

# At most this many queued items are considered for the next batch (bounds the cost of a decision).
LOOKAHEAD_LIMIT = 512
# Padded tokens at which a CPU batch stops growing (see --target-batch-tokens). Measured on 2 cores
# (MiniLM-L6, alternated server runs of 1024 and 2048): int8 rerank of 20 ~90-token pairs 136 against
# 130 pairs/s, int8 texts of 5-250 words 86 against 71 texts/s, 256-token texts 54 against 49 (int8)
# and 25 against 23 (fp32), with a lower p99 in each; 8 x 32 short texts, 128 single-text clients
# and fp32 rerank unchanged within the noise. 512 was slower again (rerank 128-138 pairs/s).
CPU_TARGET_BATCH_TOKENS = 1024


# Tokens up to which a lone single-input request runs on the event loop's thread on CPU (see
# --inline-pass-tokens): a pass of a short query takes 2-4 ms on one core, as long as the loop may be
# held. Measured on 2 vCPUs with MiniLM (two servers driven in turn, 6 runs each, the same --lone-pass
# on both): a lone int8 client 296 -> 319 requests/s without the lone-pass session and 307 -> 343 with
# it (ahead in 6 of 6 each); fp32 239 -> 242 (level); 8 and 32 single-text int8 clients level.
CPU_INLINE_PASS_TOKENS = 64


def inline_pass_tokens(device: str, setting: int | None) -> int:
    """Tokens up to which a lone request runs on the event loop's thread (0: never). Off on CUDA by default,
    where it was never measured."""
    if setting is not None:
        return setting
    return CPU_INLINE_PASS_TOKENS if device == "cpu" else 0


def pass_token_budget(device: str, max_batch_tokens: int, target_batch_tokens: int | None) -> int:
    """The most padded tokens a forward pass holds, except a single input longer than that: on CPU a
    batch stops growing at the target, on CUDA at `max_batch_tokens`."""
    target = target_batch_tokens or (CPU_TARGET_BATCH_TOKENS if device == "cpu" else max_batch_tokens)
    return min(target, max_batch_tokens)


def select_batch(lengths: Sequence[int], max_batch_tokens: int, max_batch_requests: int | None,
                 lookahead: int = LOOKAHEAD_LIMIT, groups: Sequence[int] | None = None) -> list[int]:
    """Return positions (into `lengths`, in queue order) of the items to run next.

    `lengths[0]` is the oldest item; `groups[i]` names the request of item i (without `groups`, every
    item is its own request). An item longer than the whole budget runs alone.
    """
    if not lengths:
        return []
    limit = max_batch_requests or len(lengths)
    window = min(len(lengths), lookahead)
    oldest = [position for position in range(window) if groups is not None and groups[position] == groups[0]]
    oldest = sorted(oldest or [0], key=lambda position: (lengths[position], position))

    chosen: list[int] = []
    longest = 0
    for position in oldest:
        width = max(longest, lengths[position])
        if chosen and (len(chosen) + 1 > limit or (len(chosen) + 1) * width > max_batch_tokens):
            return sorted(chosen)  # the oldest request fills this batch by itself
        chosen.append(position)
        longest = width

    taken = set(chosen)
    others = sorted((position for position in range(window) if position not in taken),
                    key=lambda position: (lengths[position], position))
    # Split the others at the padded width: those no longer (closest first), then longer ones (shortest first).
    split = next((index for index, position in enumerate(others) if lengths[position] > longest), len(others))
    for position in reversed(others[:split]):
        if len(chosen) + 1 > limit or (len(chosen) + 1) * longest > max_batch_tokens:
            return sorted(chosen)
        chosen.append(position)
    for position in others[split:]:
        width = lengths[position]
        if len(chosen) + 1 > limit or (len(chosen) + 1) * width > max_batch_tokens:
            break
        chosen.append(position)
    return sorted(chosen)
