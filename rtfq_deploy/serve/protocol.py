"""uvicorn's h11 protocol with the limits it lacks: a header-read deadline, a cap on
open connections per client address, and room for new connections at the limit.

Why: uvicorn times out a keep-alive connection only after it has answered a request,
and its ``limit_concurrency`` counts every open connection. So ~1,000 sockets that
connect and send nothing (or trickle a header byte every few seconds) stay open
forever and make every real request get 503. Here:

- every connection must complete its request line and headers within
  ``header_timeout_s`` of being accepted (or of its previous response), else it is closed;
- one address holds at most ``max_per_client`` connections; a new one beyond that is
  closed at once, before a byte is read, so one address cannot fill the server;
- when ``limit`` connections are open, a new one closes the oldest connection that has
  no request in progress (idle, or still sending its headers), so connections from many
  addresses cannot lock real requests out either: only requests being answered are
  never closed, and only they can make uvicorn answer 503.

With TLS, asyncio calls ``connection_made`` after the handshake, so these limits
start then; a connection stuck in its handshake is not counted by uvicorn either
(asyncio's own handshake timeout, 60 s, ends it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


def guarded_h11(header_timeout_s: float, max_per_client: int, limit: int | None = None) -> type[H11Protocol]:
    """An :class:`H11Protocol` subclass for one server; its bookkeeping is shared by that
    server's connections only (all of them run on the server's event loop). ``limit``:
    uvicorn's ``limit_concurrency``, the number of connections at which to make room."""
    if not (header_timeout_s > 0 and max_per_client >= 1 and (limit is None or limit >= 1)):
        raise ValueError("header_timeout_s must be > 0, max_per_client and limit >= 1")
    open_per_client: dict[str, int] = {}
    at_cap: set[str] = set()  # addresses refused since they last dropped below the cap (log once)
    waiting: OrderedDict[Any, None] = OrderedDict()  # connections with no request in progress, oldest first
    last_eviction_log = [0.0]

    class GuardedH11Protocol(H11Protocol):
        _peer: str | None = None
        _header_timer: asyncio.TimerHandle | None = None
        _waiting_cycle: Any = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            peer = self.client[0] if self.client else None
            if peer is not None:
                count = open_per_client.get(peer, 0)
                if count >= max_per_client:
                    if peer not in at_cap:
                        at_cap.add(peer)
                        log.warning("%s holds %d connections (the most per client); refusing more", peer, count)
                    transport.close()
                    return
                open_per_client[peer] = count + 1
                self._peer = peer
            if limit is not None and len(self.connections) >= limit:
                self._make_room()
            self._arm_header_timer()

        def _make_room(self) -> None:
            """Close the oldest waiting connections until this one fits under ``limit``."""
            live = sum(not c.transport.is_closing() for c in self.connections)
            evicted = 0
            while live >= limit and waiting:
                oldest, _ = waiting.popitem(last=False)
                if oldest.transport.is_closing():
                    continue
                oldest.transport.close()
                live, evicted = live - 1, evicted + 1
            now = time.monotonic()
            if evicted and now - last_eviction_log[0] > 60:
                last_eviction_log[0] = now
                log.warning("%d connections open (the limit): closing the oldest ones that have no request "
                            "in progress", limit)

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            waiting.pop(self, None)
            if self._peer is not None:
                left = open_per_client.get(self._peer, 1) - 1
                if left > 0:
                    open_per_client[self._peer] = left
                else:
                    open_per_client.pop(self._peer, None)
                if left < max_per_client:
                    at_cap.discard(self._peer)
                self._peer = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._header_timer is not None and self.cycle is not self._waiting_cycle:
                self._cancel_header_timer()  # a request's headers are complete: it is being answered
                waiting.pop(self, None)

        def on_response_complete(self) -> None:
            super().on_response_complete()  # may start a pipelined request (a new cycle)
            if not self.transport.is_closing() and self.cycle is not None and self.cycle.response_complete:
                self._arm_header_timer()  # the next request's headers get the same deadline

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._waiting_cycle = self.cycle
            self._header_timer = self.loop.call_later(header_timeout_s, self._header_timeout)
            waiting.pop(self, None)
            waiting[self] = None  # the newest waiting connection: the last to make room

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.cycle is self._waiting_cycle and not self.transport.is_closing():
                log.debug("closing a connection from %s: no complete request headers in %.1f s",
                          self._peer, header_timeout_s)
                self.transport.close()

    return GuardedH11Protocol
