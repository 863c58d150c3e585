"""Reading a server-sent-event stream (a remote expert's `stream: true` answer) with bounds.

`sse_data` turns the bytes of a response into the `data` of each event, as the SSE spec assembles
it (several `data:` lines of one event joined by newlines; comments, `event:`, `id:` and `retry:`
fields ignored; CR, LF and CRLF line ends; a leading byte-order mark dropped). A line longer than
`max_line` or a stream longer than `max_total` bytes is refused with ExpertFailed instead of being
buffered: a remote endpoint must not be able to grow the gateway's memory without bound. Each
byte is scanned once, however the stream is cut into chunks.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, AsyncIterable
from contextlib import aclosing

from concilium.errors import ExpertFailed

_BOM = b"\xef\xbb\xbf"
_EOL = re.compile(rb"[\r\n]")


class _Lines:
    """Splits bytes into lines incrementally; a CR ends its line at once (a LF right after it,
    even in the next chunk, is the same line end)."""

    def __init__(self, max_line: int, who: str) -> None:
        self.max_line, self.who = max_line, who
        self.buf = bytearray()
        self.after_cr = False
        self.first = True

    def feed(self, chunk: bytes) -> list[bytes]:
        if not chunk:
            return []
        if self.first:
            self.first = False
            chunk = chunk.removeprefix(_BOM)
        out, start = [], 0
        if self.after_cr and chunk[:1] == b"\n":
            start = 1
        self.after_cr = False
        n = len(chunk)
        while (m := _EOL.search(chunk, start)) is not None:
            end = m.start()
            self._append(chunk[start:end])
            out.append(bytes(self.buf))
            self.buf.clear()
            if chunk[end] == 0x0D:  # CR: a LF right after it belongs to the same line end
                if end + 1 < n and chunk[end + 1] == 0x0A:
                    end += 1
                elif end + 1 == n:
                    self.after_cr = True
            start = end + 1
        self._append(chunk[start:])
        return out

    def _append(self, piece: bytes) -> None:
        if len(self.buf) + len(piece) > self.max_line:
            raise ExpertFailed(f"{self.who} streamed a line over {self.max_line} bytes")
        self.buf += piece


async def sse_lines(
    chunks: AsyncIterable[bytes], *, max_line: int, max_total: int, who: str
) -> AsyncGenerator[str, None]:
    """The lines of a byte stream, decoded as UTF-8 (a trailing unterminated line included).
    Closing this closes `chunks` too."""
    lines, total = _Lines(max_line, who), 0
    it = aiter(chunks)
    try:
        async for chunk in it:
            total += len(chunk)
            if total > max_total:
                raise ExpertFailed(f"{who} streamed over {max_total} bytes")
            for line in lines.feed(chunk):
                yield _decode(line, who)
    finally:
        close = getattr(it, "aclose", None)
        if close is not None:
            await close()
    if lines.buf:
        yield _decode(bytes(lines.buf), who)


async def sse_data(
    chunks: AsyncIterable[bytes], *, max_line: int, max_total: int, who: str
) -> AsyncGenerator[str, None]:
    """The `data` of each event of an SSE byte stream, in order."""
    data: list[str] = []
    lines = sse_lines(chunks, max_line=max_line, max_total=max_total, who=who)
    async with aclosing(lines):
        async for line in lines:
            if not line:  # a blank line dispatches the event
                if data:
                    yield "\n".join(data)
                data = []
                continue
            field, _, value = line.partition(":")
            if field == "data":
                data.append(value[1:] if value.startswith(" ") else value)
    if data:  # the stream ended without the closing blank line
        yield "\n".join(data)


def _decode(line: bytes, who: str) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ExpertFailed(f"{who} streamed a line that is not UTF-8: {e}") from None
