"""The remote experts' HTTP client checks the address it connects to, not only the registered URL.

A host name that passed registration can later resolve elsewhere (DNS rebinding: a short TTL, then
169.254.169.254). `GuardedBackend` sits under httpcore's connection pool: every new connection
resolves the host itself, refuses it when *any* address is one registration would refuse
(metadata, link-local, multicast, unspecified, reserved; private and loopback too with
``allow_private=False``), and connects to the checked address. TLS still verifies the certificate
against the host name (httpcore's `server_hostname` is the URL's host, not the address), and
pooled connections are keyed by host name, so one host's connection never serves another.
A refusal is an `httpcore.ConnectError`, which the remote expert reports as ExpertUnavailable.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import httpcore
import httpx

from concilium.errors import UnsafeURL
from concilium.registry.urls import IPAddress, check_ip, ip_literal, parse_ip

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]
CACHE_S = 10.0  # a checked resolution is reused this long (the address is the checked one)


async def resolve(host: str, port: int) -> list[IPAddress]:
    """The addresses `host` resolves to now, through the event loop's resolver."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [ip for info in infos if (ip := parse_ip(str(info[4][0]))) is not None]


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """A network backend that connects only to addresses a remote expert may have."""

    def __init__(
        self,
        inner: httpcore.AsyncNetworkBackend | None = None,
        *,
        allow_private: bool = True,
        resolver: Resolver = resolve,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner or httpcore.AnyIOBackend()
        self.allow_private, self.resolver, self.clock = allow_private, resolver, clock
        self._cache: dict[tuple[str, int], tuple[float, list[IPAddress]]] = {}

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        error: Exception = httpcore.ConnectError(f"{host!r} resolves to no address")
        addrs = await self.addresses(host, port, timeout)
        for i, ip in enumerate(addrs):
            # every address left gets its share of the timeout (at least 1 s of it), so one
            # that drops packets (say an unrouted IPv6) leaves time for the next
            left = len(addrs) - i
            each = None if timeout is None else max(timeout / left, min(timeout, 1.0))
            try:
                return await self.inner.connect_tcp(
                    str(ip), port, each, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as e:
                error = e  # the next address, as a resolver-ordered connect would
        raise error

    async def addresses(self, host: str, port: int, timeout: float | None) -> list[IPAddress]:
        """The checked addresses to try for `host`; httpcore.ConnectError when one is refused."""
        literal = ip_literal(host)
        if literal is not None:
            return self._checked(host, [literal], via=None)
        key = (host.lower(), port)
        hit = self._cache.get(key)
        if hit is not None and self.clock() - hit[0] < CACHE_S:
            return hit[1]
        try:
            async with asyncio.timeout(timeout):
                addrs = await self.resolver(host, port)
        except TimeoutError as e:
            raise httpcore.ConnectTimeout(f"resolving {host!r} timed out") from e
        except (OSError, UnicodeError) as e:
            raise httpcore.ConnectError(f"{host!r} does not resolve: {e}") from e
        checked = self._checked(host, addrs, via=host)
        self._cache[key] = (self.clock(), checked)
        return checked

    def _checked(self, host: str, addrs: list[IPAddress], via: str | None) -> list[IPAddress]:
        try:
            for ip in addrs:
                check_ip(ip, host, self.allow_private, via=via)
        except UnsafeURL as e:
            log.warning("refused to connect to a remote expert: %s", e.message)
            raise httpcore.ConnectError(f"refused to connect: {e.message}") from None
        return addrs

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("remote experts are reached over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with its connection pool on a `GuardedBackend` (no proxy: a proxy
    would make the connection the guard checks the proxy's, not the expert's)."""

    def __init__(self, backend: GuardedBackend, limits: httpx.Limits | None = None) -> None:
        limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20)
        super().__init__(limits=limits, trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(),  # SSL_CERT_FILE / SSL_CERT_DIR honoured
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=backend,
        )


def guarded_client(*, allow_private: bool = True, **kw: Any) -> httpx.AsyncClient:
    """The remote experts' client: every connection's address checked (see module doc)."""
    backend = GuardedBackend(allow_private=allow_private)
    return httpx.AsyncClient(transport=GuardedTransport(backend), trust_env=False, **kw)
