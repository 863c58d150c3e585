"""The remote experts' client checks every connection's address (DNS rebinding cannot reach
metadata or, when refused, private addresses) and connects to the address it checked."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import httpcore
import httpx
import pytest

from concilium.errors import ExpertUnavailable
from concilium.experts.base import GenParams
from concilium.experts.guard import GuardedBackend, GuardedTransport, guarded_client
from concilium.experts.remote import RemoteExpert
from concilium.registry.specs import RemoteSpec
from concilium.registry.urls import IPAddress
from tests.conftest import no_hang

OK = b'{"choices": [{"message": {"content": "yo"}, "finish_reason": "stop"}]}'
RESPONSE = [
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n",
    f"Content-Length: {len(OK)}\r\n\r\n".encode(),
    OK,
]


class Recording(httpcore.AsyncMockBackend):
    """A network that answers every connection with one canned response; records where to."""

    def __init__(self) -> None:
        super().__init__(RESPONSE)
        self.connects: list[tuple[str, int]] = []

    async def connect_tcp(self, host: str, port: int, *a: Any, **kw: Any) -> Any:
        self.connects.append((host, port))
        return await super().connect_tcp(host, port, *a, **kw)


def dns(table: dict[str, list[str]], calls: list[str] | None = None) -> Any:
    async def resolver(host: str, port: int) -> list[IPAddress]:
        if calls is not None:
            calls.append(host)
        if host not in table:
            raise OSError("Name or service not known")
        return [ipaddress.ip_address(a) for a in table[host]]

    return resolver


def get(url: str, backend: GuardedBackend) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=GuardedTransport(backend)) as c:
            return await c.get(url)

    with no_hang(5, "a guarded request"):
        return asyncio.run(go())


def test_a_checked_host_is_reached_at_the_address_that_was_checked() -> None:
    net = Recording()
    backend = GuardedBackend(net, resolver=dns({"api.example.com": ["93.184.216.34"]}))
    r = get("http://api.example.com:8080/v1/models", backend)
    assert r.status_code == 200 and net.connects == [("93.184.216.34", 8080)]


@pytest.mark.parametrize(
    "addrs",
    [
        ["169.254.169.254"],  # cloud metadata
        ["93.184.216.34", "169.254.169.254"],  # one bad address of several is enough
        ["fe80::1"],
        ["::ffff:169.254.169.254"],  # IPv4-mapped
        ["224.0.0.1"],
        ["0.0.0.0"],
    ],
)
def test_a_host_that_now_resolves_to_a_forbidden_address_is_refused_unconnected(
    addrs: list[str],
) -> None:
    net = Recording()
    backend = GuardedBackend(net, resolver=dns({"api.example.com": addrs}))
    with pytest.raises(httpx.ConnectError, match=r"refused to connect: .*resolves to"):
        get("http://api.example.com/v1/models", backend)
    assert net.connects == []


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest", "http://[fe80::1]/x"])
def test_forbidden_ip_literals_are_refused(url: str) -> None:
    net = Recording()
    with pytest.raises(httpx.ConnectError, match="refused to connect"):
        get(url, GuardedBackend(net, resolver=dns({})))
    assert net.connects == []


def test_private_addresses_pass_only_when_allowed() -> None:
    table = {"inference.internal": ["10.1.2.3"]}
    net = Recording()
    assert get("http://inference.internal/v1", GuardedBackend(net, resolver=dns(table))).is_success
    strict = GuardedBackend(Recording(), allow_private=False, resolver=dns(table))
    with pytest.raises(httpx.ConnectError, match="private or loopback"):
        get("http://inference.internal/v1", strict)
    with pytest.raises(httpx.ConnectError, match="private or loopback"):
        get("http://127.0.0.1:9/v1", GuardedBackend(Recording(), allow_private=False))


def test_a_host_that_does_not_resolve_is_a_connect_error() -> None:
    with pytest.raises(httpx.ConnectError, match="does not resolve"):
        get("http://nowhere.invalid/v1", GuardedBackend(Recording(), resolver=dns({})))


def test_a_resolution_is_reused_briefly_then_checked_again() -> None:
    calls: list[str] = []
    table = {"api.example.com": ["93.184.216.34"]}
    now = [0.0]
    backend = GuardedBackend(Recording(), resolver=dns(table, calls), clock=lambda: now[0])

    async def addresses() -> list[IPAddress]:
        return await backend.addresses("api.example.com", 443, None)

    assert asyncio.run(addresses()) == [ipaddress.ip_address("93.184.216.34")]
    now[0] = 5
    asyncio.run(addresses())
    assert calls == ["api.example.com"]
    table["api.example.com"] = ["169.254.169.254"]  # rebound
    now[0] = 11
    with pytest.raises(httpcore.ConnectError, match="refused"):
        asyncio.run(addresses())
    assert calls == ["api.example.com", "api.example.com"]


def test_a_remote_expert_behind_a_rebound_name_is_unavailable_not_reached() -> None:
    spec = RemoteSpec(name="r", url="http://api.example.com/v1", model_name="m", timeout_s=2)
    net = Recording()
    backend = GuardedBackend(net, resolver=dns({"api.example.com": ["169.254.169.254"]}))

    async def go() -> None:
        async with httpx.AsyncClient(transport=GuardedTransport(backend)) as c:
            await RemoteExpert(spec, c).chat([{"role": "user", "content": "hi"}], GenParams())

    with pytest.raises(ExpertUnavailable, match="refused to connect"):
        asyncio.run(go())
    assert net.connects == []


def test_the_default_client_reaches_a_real_local_server() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"".join(RESPONSE))
        await writer.drain()
        writer.close()

    async def go() -> tuple[int, str]:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, guarded_client() as c:
            spec = RemoteSpec(name="r", url=f"http://localhost:{port}/v1", model_name="m")
            gen = await RemoteExpert(spec, c).chat([{"role": "user", "content": "hi"}], GenParams())
            return port, gen.text

    with no_hang(10, "a local server"):
        assert asyncio.run(go())[1] == "yo"
