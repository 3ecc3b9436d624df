"""Server-wide limits that keep one client or tenant from taking the service from the others.

* :class:`StreamLimiter`: streaming calls in flight, server-wide (``--max-concurrent-streams``)
  and per tenant (``--max-streams-per-tenant``).
* :class:`ByteBudget`: bytes buffered by uploads in flight (``--max-buffered-bytes``); each call
  holds a :class:`Reservation` that it grows as bytes arrive and that is returned when the call
  ends, however it ends.
* :class:`IdleLimit`: ends a client stream that sends nothing for ``--idle-timeout`` seconds.

Everything here runs on the event loop (no locks needed: no await between check and update).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from kvpack.errors import DeadlineExceeded, ResourceExhausted


class StreamLimiter:
    """Counts streaming RPCs in flight, in all and per tenant; past either limit new ones get
    RESOURCE_EXHAUSTED naming that limit."""

    def __init__(self, limit: int, per_tenant: int) -> None:
        self.limit = limit
        self.per_tenant = per_tenant
        self.active = 0
        self.by_tenant: dict[str, int] = {}

    def acquire(self, tenant: str) -> None:
        held = self.by_tenant.get(tenant, 0)
        if held >= self.per_tenant:
            raise ResourceExhausted(
                f"tenant {tenant!r} is at its limit of {self.per_tenant} concurrent streams "
                "(--max-streams-per-tenant); retry later"
            )
        if self.active >= self.limit:
            raise ResourceExhausted(
                f"server is at its limit of {self.limit} concurrent streams "
                "(--max-concurrent-streams); retry later"
            )
        self.active += 1
        self.by_tenant[tenant] = held + 1

    def release(self, tenant: str) -> None:
        self.active -= 1
        left = self.by_tenant[tenant] - 1
        if left:
            self.by_tenant[tenant] = left
        else:
            del self.by_tenant[tenant]  # idle tenants cost no memory


class ByteBudget:
    """The server-wide cap on bytes held by uploads in flight (``limit`` bytes)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def reservation(self) -> Reservation:
        """A per-call account against this budget; :meth:`Reservation.close` it when done."""
        return Reservation(self)


class Reservation:
    """Bytes one call holds of a :class:`ByteBudget`."""

    def __init__(self, budget: ByteBudget) -> None:
        self.budget = budget
        self.held = 0

    def take(self, nbytes: int, what: str) -> None:
        """Count ``nbytes`` more (about to be buffered for ``what``); RESOURCE_EXHAUSTED naming
        the cap when the server as a whole would hold more than it allows."""
        b = self.budget
        if b.used + nbytes > b.limit:
            raise ResourceExhausted(
                f"{what}: the server already buffers {b.used} bytes of uploads in flight; "
                f"{nbytes} more would pass --max-buffered-bytes={b.limit}; retry later"
            )
        b.used += nbytes
        self.held += nbytes

    def give_back(self, nbytes: int) -> None:
        """Return ``nbytes`` that are no longer buffered (at most what is held)."""
        nbytes = min(nbytes, self.held)
        self.held -= nbytes
        self.budget.used -= nbytes

    def close(self) -> None:
        """Return everything this call still holds (idempotent)."""
        self.give_back(self.held)


class IdleLimit:
    """Async iterator over a client stream that raises DeadlineExceeded when the client sends no
    message for ``timeout`` seconds (``--idle-timeout``): a client trickling bytes, or one that
    opened a stream and went quiet, cannot hold a stream slot and its buffers forever.

    Only the time spent waiting for the client counts, not time the server spends working
    between reads (then the client is held back by flow control, through no fault of its own).
    """

    def __init__(self, requests: AsyncIterator[Any], timeout: float, what: str) -> None:
        self._it = aiter(requests)
        self.timeout = timeout
        self.what = what

    def __aiter__(self) -> IdleLimit:
        return self

    async def __anext__(self) -> Any:
        try:
            async with asyncio.timeout(self.timeout):
                return await anext(self._it)
        except TimeoutError:
            raise DeadlineExceeded(
                f"{self.what}: no message from the client for {self.timeout:g} s "
                "(--idle-timeout); the call was ended and its memory freed"
            ) from None
