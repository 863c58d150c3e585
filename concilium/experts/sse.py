"""Reading a server-sent-event stream (a remote expert's `stream: true` answer) with bounds.

`sse_data` turns the bytes of a response into the `data` of each event, as the SSE spec assembles
it (several `data:` lines of one event joined by newlines; comments, `event:`, `id:` and `retry:`
fields ignored; CR, LF and CRLF line ends). A line longer than `max_line` or a stream longer than
`max_total` bytes is refused with ExpertFailed instead of being buffered: a remote endpoint must
not be able to grow the gateway's memory without bound.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, AsyncIterable

from concilium.errors import ExpertFailed

_LINE_END = re.compile(rb"\r\n|\r|\n")


async def sse_lines(
    chunks: AsyncIterable[bytes], *, max_line: int, max_total: int, who: str
) -> AsyncGenerator[str, None]:
    """The lines of a byte stream, decoded as UTF-8 (a trailing unterminated line included)."""
    buf, total = b"", 0
    async for chunk in chunks:
        total += len(chunk)
        if total > max_total:
            raise ExpertFailed(f"{who} streamed over {max_total} bytes")
        buf += chunk
        tail = b"\r" if buf.endswith(b"\r") else b""  # may be the first half of a CRLF
        pieces = _LINE_END.split(buf[: len(buf) - len(tail)])
        buf = pieces.pop() + tail
        if len(buf) > max_line:
            raise ExpertFailed(f"{who} streamed a line over {max_line} bytes")
        for line in pieces:
            yield _decode(line, who)
    if buf.rstrip(b"\r"):
        yield _decode(buf.rstrip(b"\r"), who)


async def sse_data(
    chunks: AsyncIterable[bytes], *, max_line: int, max_total: int, who: str
) -> AsyncGenerator[str, None]:
    """The `data` of each event of an SSE byte stream, in order."""
    data: list[str] = []
    async for line in sse_lines(chunks, max_line=max_line, max_total=max_total, who=who):
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
