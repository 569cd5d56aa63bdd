"""A pool of upstream URLs serving one model: least outstanding requests first, failing members out.

Plain state, no I/O: the proxy reports outcomes, the health checker reports probes. All calls happen
on the event loop thread, so no locks are needed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Member:
    url: str
    outstanding: int = 0
    down_since: float | None = None
    last_error: str = ""
    failures: int = 0

    @property
    def up(self) -> bool:
        return self.down_since is None


@dataclass
class Pool:
    name: str
    members: list[Member]
    _turn: int = field(default=0, repr=False)

    @classmethod
    def of(cls, name: str, urls: list[str]) -> Pool:
        return cls(name, [Member(url) for url in urls])

    def pick(self, exclude: set[str]) -> Member | None:
        """The healthy member with the fewest outstanding requests (ties rotate). When every member is
        down, the one down longest is tried anyway: a pool never refuses on stale news alone."""
        candidates = [member for member in self.members if member.url not in exclude]
        if not candidates:
            return None
        healthy = [member for member in candidates if member.up]
        if healthy:
            self._turn += 1
            fewest = min(member.outstanding for member in healthy)
            tied = [member for member in healthy if member.outstanding == fewest]
            return tied[self._turn % len(tied)]
        return min(candidates, key=lambda member: member.down_since or 0.0)

    def mark_down(self, member: Member, reason: str) -> None:
        if member.down_since is None:
            member.down_since = time.monotonic()
        member.failures += 1
        member.last_error = reason

    def mark_up(self, member: Member) -> None:
        member.down_since = None
        member.last_error = ""

    def down(self) -> list[Member]:
        return [member for member in self.members if not member.up]
