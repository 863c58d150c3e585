"""Registration-time check of a remote OpenAI-compatible expert's base URL (SSRF guard).

Only http(s) with a host and no userinfo is accepted; IP literals (legacy numeric IPv4 forms
included) and every address a host name resolves to must not be link-local, cloud metadata,
multicast, unspecified or reserved (nor private / loopback with ``allow_private=False``). IPv4
addresses wrapped in IPv4-mapped, NAT64 or 6to4 IPv6 are checked as IPv4. A host name that does
not resolve is accepted (the endpoint may come up later); resolution can change after registration
(DNS rebinding), so the remote experts' HTTP client checks the address of every connection it
opens with `check_ip` as well (``concilium.experts.guard``).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from urllib.parse import SplitResult, urlsplit

from concilium.errors import UnsafeURL

__all__ = [
    "METADATA_HOSTS",
    "METADATA_IPS",
    "IPAddress",
    "check_ip",
    "ip_literal",
    "parse_ip",
    "validate_remote_url",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
METADATA_HOSTS = frozenset(
    {"metadata", "metadata.google.internal", "metadata.goog", "instance-data"}
)
METADATA_IPS = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "192.0.0.192")
)
_THIS_NET = ipaddress.ip_network("0.0.0.0/8")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NUMERIC_V4 = re.compile(r"(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}")
_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def validate_remote_url(url: str, *, allow_private: bool = True) -> str:
    """Check a remote expert's base URL; return it normalised (lower-case scheme and host, no
    default port, no fragment, no trailing '/').

    Refused: non-http(s) schemes, missing host, userinfo, link-local / cloud-metadata / multicast /
    unspecified / reserved addresses, and (with `allow_private=False`) private and loopback ones.
    A host name is resolved with `socket.getaddrinfo`; every address it resolves to must pass.
    Failure to resolve is not an error: the endpoint may not be reachable at registration time.
    """
    parts = _split_url(url)
    host = _host_of(parts, url)
    port = _port_of(parts, url)
    ip = _ip_literal(host, url)
    if ip is not None:
        check_ip(ip, url, allow_private)
        host = f"[{ip}]" if ip.version == 6 else str(ip)
    else:
        host = _check_host_name(host, url)
        for addr in _resolve(host, port or _DEFAULT_PORTS[parts.scheme.lower()]):
            check_ip(addr, url, allow_private, via=host)
    scheme = parts.scheme.lower()
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    query = f"?{parts.query}" if parts.query else ""
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}{query}"


def _split_url(url: str) -> SplitResult:
    if not isinstance(url, str) or not url:
        raise UnsafeURL(f"URL must be a non-empty string, got {url!r}")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F or c == "\\" for c in url):
        raise UnsafeURL(f"{url!r}: contains whitespace, control characters or a backslash")
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise UnsafeURL(f"{url!r}: not a valid URL ({e})") from None
    if parts.scheme.lower() not in _DEFAULT_PORTS:
        raise UnsafeURL(f"{url!r}: scheme {parts.scheme!r} not allowed (use http or https)")
    if "@" in parts.netloc:  # the message leaves the URL out: it holds a credential
        raise UnsafeURL(
            f"URL for host {parts.hostname!r}: userinfo (user:password@) is not allowed; "
            "give credentials through api_key_env"
        )
    return parts


def _host_of(parts: SplitResult, url: str) -> str:
    if not parts.hostname:
        raise UnsafeURL(f"{url!r}: no host")
    return parts.hostname


def _port_of(parts: SplitResult, url: str) -> int | None:
    try:
        port = parts.port
    except ValueError as e:
        raise UnsafeURL(f"{url!r}: invalid port ({e})") from None
    if port == 0:
        raise UnsafeURL(f"{url!r}: port 0 is not allowed")
    return port


def parse_ip(text: str) -> IPAddress | None:
    """An IP address in its standard notation (an IPv6 zone id dropped), or None."""
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def ip_literal(host: str) -> IPAddress | None:
    """The address when `host` is an IP literal (legacy numeric IPv4 forms included), else None
    (a host name, or something that is neither)."""
    try:
        return _ip_literal(host.strip("[]"), host)
    except UnsafeURL:
        return None


def _ip_literal(host: str, url: str) -> IPAddress | None:
    """The address when `host` is an IP literal, including legacy forms like 2852039166."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if ":" in host:
        raise UnsafeURL(f"{url!r}: host {host!r} is not a valid IPv6 address")
    if not _NUMERIC_V4.fullmatch(host):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        raise UnsafeURL(f"{url!r}: host {host!r} is not a valid IPv4 address") from None


def _check_host_name(host: str, url: str) -> str:
    try:
        name = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise UnsafeURL(f"{url!r}: host {host!r} is not a valid host name") from None
    if len(name) > 253 or not _HOST_NAME.fullmatch(name):
        raise UnsafeURL(f"{url!r}: host {host!r} is not a valid host name")
    name = name.rstrip(".")
    if name in METADATA_HOSTS:
        raise UnsafeURL(f"{url!r}: host {host!r} is a cloud metadata endpoint")
    return name


def _resolve(host: str, port: int) -> list[IPAddress]:
    """Addresses `host` resolves to now; [] when it does not resolve (not an error here)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    return [ip for info in infos if (ip := parse_ip(str(info[4][0]))) is not None]


def _unwrap(ip: IPAddress) -> IPAddress:
    """The IPv4 address inside an IPv4-mapped, NAT64 or 6to4 IPv6 address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if ip.sixtofour is not None:
            return ip.sixtofour
    return ip


def _forbidden(ip: IPAddress) -> str | None:
    """Why `ip` may never be an expert's address, or None."""
    if ip in METADATA_IPS:
        return "a cloud metadata address"
    if ip.is_link_local:
        return "link-local (169.254.0.0/16, fe80::/10)"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified or (ip.version == 4 and ip in _THIS_NET):
        return "unspecified (0.0.0.0/8, ::)"
    if ip.is_reserved and not ip.is_loopback:
        return "reserved"
    return None


def _private(ip: IPAddress) -> bool:
    """Not globally reachable; fec0::/10 (deprecated site-local) included, which ipaddress
    calls global."""
    return not ip.is_global or (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local)


def check_ip(ip: IPAddress, url: str, allow_private: bool, via: str | None = None) -> None:
    """UnsafeURL (naming `url`, and `via` the host name that resolved to `ip`) when `ip` is no
    address for a remote expert."""
    inner = _unwrap(ip)
    shown = f"{via!r} resolves to {ip}" if via else f"{ip}"
    if reason := _forbidden(inner):
        raise UnsafeURL(f"{url!r}: host {shown}, which is {reason}")
    if not allow_private and _private(inner):
        raise UnsafeURL(f"{url!r}: host {shown}, a private or loopback address (not allowed here)")
