"""uvicorn's httptools protocol with the limits it lacks: request-head size, header count and a
deadline for the head.

Without them one client can send a 100 MB header (httptools concatenates it piece by piece
on the event loop, stalling every other request and the health probes) or open connections
and trickle bytes forever. Checks happen before the ASGI app sees anything, so no route,
slot or model is involved; the client gets 431 or 408 and the connection is closed.
The body deadline is enforced in ``app.api.guard`` (it needs the route to know which limit).
"""

from __future__ import annotations

import logging
from asyncio import TimerHandle
from typing import Any

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.config import Settings

log = logging.getLogger("modserve.http")

_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class _HeadTooLarge(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    max_header_bytes = 32 * 1024
    max_header_count = 100
    header_timeout = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._awaiting_head = True  # the next bytes belong to a request line and headers
        self._head_bytes = 0
        self._header_count = 0
        self._head_done_in_feed = self._head_began_in_feed = False
        self._parsed_head_bytes = 0
        self._head_timer: TimerHandle | None = None
        self._refused = False

    # ---- connection ------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head_timer()  # a connection that never sends a request is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._unset_keepalive_if_required()
        if self._awaiting_head and self._head_timer is None:
            self._start_head_timer()
        counting = self._awaiting_head  # bytes of this feed belong to a request head only if one was
        self._head_done_in_feed = self._head_began_in_feed = False  # awaited or began in it
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self._refuse(431, exc.__context__.message)
                return
            self._bad_request()
            return
        except httptools.HttpParserError:
            self._bad_request()
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._awaiting_head and not self._head_done_in_feed and (counting or self._head_began_in_feed):
            self._head_bytes += len(data)
            if self._head_bytes > self.max_header_bytes:
                self._refuse(431, f"request line and headers exceed {self.max_header_bytes} bytes")

    def _bad_request(self) -> None:
        self._refuse(400, "invalid HTTP request (malformed request line, headers, framing or chunk sizes)")

    # ---- parser callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._header_count = self._parsed_head_bytes = 0
        self._head_began_in_feed = True
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.max_header_count:
            raise _HeadTooLarge(f"more than {self.max_header_count} request headers")
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_head(self, size: int) -> None:
        """Exact count of what the parser hands over (the read that completes a head included)."""
        self._parsed_head_bytes += size
        if self._parsed_head_bytes > self.max_header_bytes:
            raise _HeadTooLarge(f"request line and headers exceed {self.max_header_bytes} bytes")

    def on_headers_complete(self) -> None:
        self._awaiting_head, self._head_bytes, self._head_done_in_feed = False, 0, True
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._awaiting_head, self._head_bytes = True, 0
        super().on_message_complete()

    # ---- refusals ----------------------------------------------------------------------------

    def _start_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._awaiting_head or self.transport.is_closing():
            return
        if self._head_bytes == 0:
            self.transport.close()  # an idle connection: nothing to answer
            return
        self._refuse(408, f"request line and headers not received within {self.header_timeout:g} s")

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with a JSON error and close: the rest of the request is never read."""
        self._refused = True
        self._cancel_head_timer()
        log.info("refused a request from %s: %d %s", self.client, status, message)
        if self.transport.is_closing():
            return
        body = orjson.dumps({"error": message})
        head = (
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (status, _REASONS[status], len(body))
        )
        self.transport.write(head + body)
        self.transport.close()


def protocol_for(settings: Settings) -> type[GuardedHttpToolsProtocol]:
    """A protocol class with this server's limits (uvicorn instantiates it per connection)."""
    return type(
        "ModservHttpProtocol",
        (GuardedHttpToolsProtocol,),
        {
            "max_header_bytes": settings.max_header_bytes,
            "max_header_count": settings.max_header_count,
            "header_timeout": settings.header_timeout,
        },
    )
