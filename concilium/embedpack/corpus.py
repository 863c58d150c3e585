"""Domain corpora from the docstrings of installed packages: query = summary, document = the rest.

Each domain is a fixed list of modules. Every public function, class and method found there
(sorted by name, so the walk is deterministic) whose docstring has a one-paragraph summary and a
body yields one ``Item``: the summary is a query, and ``<path><signature>`` + the body is the one
document relevant to it. Relevance is therefore exact: a query's answer is its own docstring.

Items whose summary or body occurs twice (aliases, re-exports, generic summaries such as
"Initialize self.") are dropped so that every query has exactly one relevant document.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any

__all__ = ["DOMAINS", "Domain", "Item", "extract", "package_versions"]


@dataclass(frozen=True, slots=True)
class Domain:
    """One embedding expert's domain: the modules its text comes from."""

    name: str
    description: str
    categories: tuple[str, ...]
    modules: tuple[str, ...]
    distributions: tuple[
        str, ...
    ]  # installed distributions the text comes from (versions recorded)


@dataclass(frozen=True, slots=True)
class Item:
    """One (query, document) pair: a docstring's summary and the rest of it."""

    domain: str
    path: str  # e.g. "scipy.linalg.qr"
    query: str
    document: str


def _mods(text: str) -> tuple[str, ...]:
    return tuple(text.split())


DOMAINS: tuple[Domain, ...] = (
    Domain(
        name="numerics",
        description="Numerical computing: arrays, linear algebra, FFT, statistics, optimisation, "
        "signal processing, special functions (NumPy / SciPy documentation).",
        categories=("numerics", "linear-algebra", "statistics"),
        modules=_mods(
            """numpy numpy.linalg numpy.fft numpy.random numpy.polynomial.polynomial numpy.ma
            scipy.linalg scipy.special scipy.stats scipy.optimize scipy.signal scipy.interpolate
            scipy.integrate scipy.sparse scipy.sparse.linalg scipy.spatial scipy.ndimage
            scipy.cluster.hierarchy"""
        ),
        distributions=("numpy", "scipy"),
    ),
    Domain(
        name="graphs",
        description="Graph algorithms and network analysis: shortest paths, centrality, "
        "flows, matchings, communities, graph generators (NetworkX documentation).",
        categories=("graphs", "networks", "algorithms"),
        modules=_mods(
            """networkx networkx.algorithms.community networkx.algorithms.approximation
            networkx.algorithms.bipartite networkx.generators networkx.linalg networkx.readwrite"""
        ),
        distributions=("networkx",),
    ),
    Domain(
        name="ml",
        description="Machine learning and deep learning: neural network layers, losses, "
        "optimisers, data loaders, model training, tokenisers, estimators and metrics "
        "(PyTorch / Transformers / scikit-learn documentation).",
        categories=("machine-learning", "deep-learning"),
        modules=_mods(
            """torch.nn torch.nn.functional torch.nn.init torch.nn.utils torch.optim
            torch.optim.lr_scheduler torch.utils.data torch.autograd torch.distributions
            transformers.trainer transformers.training_args transformers.modeling_utils
            transformers.tokenization_utils_base transformers.generation.utils
            transformers.generation.logits_process transformers.generation.stopping_criteria
            transformers.optimization transformers.data.data_collator transformers.trainer_callback
            transformers.cache_utils transformers.pipelines sklearn.linear_model sklearn.metrics
            sklearn.model_selection sklearn.preprocessing sklearn.ensemble sklearn.cluster
            sklearn.decomposition sklearn.feature_extraction.text sklearn.neighbors sklearn.svm
            sklearn.tree sklearn.pipeline sklearn.feature_selection sklearn.impute
            sklearn.naive_bayes"""
        ),
        distributions=("torch", "transformers", "scikit-learn"),
    ),
    Domain(
        name="web",
        description="Web and networking: HTTP clients and servers, requests and responses, "
        "routing, middleware, cookies, headers, URLs, sockets, websockets, mail protocols "
        "(httpx / Starlette / FastAPI / uvicorn / aiohttp / requests documentation).",
        categories=("web", "http", "networking"),
        modules=_mods(
            """httpx starlette.applications starlette.routing starlette.requests
            starlette.responses starlette.middleware starlette.datastructures starlette.staticfiles
            starlette.websockets starlette.testclient starlette.background fastapi fastapi.params
            fastapi.security fastapi.routing fastapi.applications uvicorn uvicorn.config aiohttp
            aiohttp.web aiohttp.client_reqrep aiohttp.web_request aiohttp.web_response
            aiohttp.web_urldispatcher aiohttp.web_ws aiohttp.client_ws aiohttp.cookiejar
            aiohttp.multipart requests requests.sessions requests.models requests.utils
            requests.adapters requests.cookies urllib3 urllib3.util websockets urllib.parse
            urllib.request urllib.robotparser http.client http.cookies http.cookiejar http.server
            socket ssl ipaddress smtplib ftplib poplib imaplib socketserver wsgiref.simple_server
            wsgiref.util wsgiref.headers xmlrpc.client mimetypes html.parser webbrowser"""
        ),
        distributions=(
            "httpx",
            "starlette",
            "fastapi",
            "uvicorn",
            "aiohttp",
            "requests",
            "urllib3",
            "websockets",
        ),
    ),
    Domain(
        name="stdlib",
        description="The Python standard library: files and paths, processes, text and "
        "strings, dates, collections, iteration, data formats, logging, argument parsing.",
        categories=("python", "files", "text"),
        modules=_mods(
            """os os.path shutil pathlib subprocess tempfile glob fnmatch filecmp string textwrap
            re difflib shlex csv json datetime time calendar collections itertools functools
            operator zipfile tarfile gzip bz2 lzma zlib base64 binascii logging argparse
            configparser heapq bisect threading queue asyncio multiprocessing concurrent.futures
            sqlite3 inspect typing types io codecs unicodedata hashlib pickle shelve struct locale
            gettext email.message email.utils email.parser email.headerregistry
            xml.etree.ElementTree xml.dom.minidom decimal enum dataclasses contextlib copy pprint
            uuid signal mmap selectors platform importlib importlib.resources pkgutil traceback
            warnings weakref array plistlib unittest doctest timeit tokenize ast dis secrets
            sched"""
        ),
        distributions=(),
    ),
)
_ALIASES = {"posix": "os", "nt": "os"}  # where the C implementations of a module say they live

_SKIP_SUMMARY = re.compile(
    r"^(alias|deprecated|see |see:|initialize self|return self|create and return|"
    r"implement |helper for|for internal|this (function|method) is deprecated)",
    re.IGNORECASE,
)
_WORD = re.compile(r"\w+")
MAX_BODY_CHARS = 480
MAX_SIG_CHARS = 160
_SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)\s*(->.*)?$")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_ROLE = re.compile(r":[\w:]+:`~?([^`<]+?)(\s*<[^>]*>)?`")


def package_versions(domains: tuple[Domain, ...] = DOMAINS) -> dict[str, str]:
    """{distribution: version} of every package the corpora come from, plus Python itself."""
    import platform

    out = {"python": platform.python_version()}
    for d in domains:
        for dist in d.distributions:
            out[dist] = metadata.version(dist)
    return dict(sorted(out.items()))


def extract(domain: Domain) -> list[Item]:
    """Every usable (summary, rest-of-docstring) pair of a domain, deduplicated, in walk order."""
    items = [it for path, obj in _walk(domain.modules) if (it := _item(domain.name, path, obj))]
    queries = Counter(_norm(it.query) for it in items)
    bodies = Counter(_norm(it.document.split("\n", 1)[1]) for it in items)
    return [
        it
        for it in items
        if queries[_norm(it.query)] == 1 and bodies[_norm(it.document.split("\n", 1)[1])] == 1
    ]


def _walk(modules: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
    """(dotted path, object) of public routines, classes and their own methods; each object once."""
    seen: set[int] = set()
    roots = {_root(m) for m in modules}
    for mod_name in modules:
        mod = importlib.import_module(mod_name)
        for name in sorted(dir(mod)):
            obj = _public(mod, name)
            if obj is None or id(obj) in seen or not _lives_in(obj, roots):
                continue
            seen.add(id(obj))
            yield f"{mod_name}.{name}", obj
            if inspect.isclass(obj):
                for mname in sorted(vars(obj)):
                    member = vars(obj)[mname]
                    if not mname.startswith("_") and id(member) not in seen:
                        seen.add(id(member))
                        yield f"{mod_name}.{name}.{mname}", member


def _root(module: str) -> str:
    top = module.split(".", 1)[0].lstrip("_")
    return _ALIASES.get(top, top)


def _lives_in(obj: Any, roots: set[str]) -> bool:
    """Defined by one of the domain's packages (not a builtin or another package re-exported)."""
    home = getattr(obj, "__module__", None)
    return not isinstance(home, str) or _root(home) in roots


def _public(mod: Any, name: str) -> Any:
    if name.startswith("_"):
        return None
    try:
        obj = getattr(mod, name)
    except Exception:  # lazy modules may fail on access; such a member is simply skipped
        return None
    return None if inspect.ismodule(obj) else obj


def _own_doc(obj: Any) -> str | None:
    if isinstance(obj, staticmethod | classmethod):
        obj = obj.__func__
    doc = getattr(obj, "__doc__", None)
    if not isinstance(doc, str):
        return None
    plain = inspect.isroutine(obj) or inspect.isclass(obj) or isinstance(obj, property)
    if not plain and doc == getattr(type(obj), "__doc__", None):
        return None  # an instance (a constant) that only carries its type's docstring
    return doc


def _item(domain: str, path: str, obj: Any) -> Item | None:
    doc = _own_doc(obj)
    if not doc:
        return None
    paras = [p.strip() for p in re.split(r"\n\s*\n", inspect.cleandoc(doc)) if p.strip()]
    sig = _signature(obj)
    while paras and "\n" not in paras[0] and _SIGNATURE_LINE.match(paras[0]):
        line = paras.pop(0)
        sig = sig or line[line.find("(") :]
    if len(paras) < 2:
        return None
    query = _clean(" ".join(paras[0].split()))
    body = _clean("\n\n".join(paras[1:]))
    if not _good_query(query) or len(_WORD.findall(body)) < 12:
        return None
    body = _truncate(body, MAX_BODY_CHARS)
    return Item(domain, path, query, f"{path}{_truncate(sig, MAX_SIG_CHARS)}\n{body}")


def _signature(obj: Any) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""
    return _ADDRESS.sub("", sig)  # "<object object at 0x7f..>" differs from run to run


def _good_query(q: str) -> bool:
    n = len(_WORD.findall(q))
    return 4 <= n <= 40 and ">>>" not in q and not _SKIP_SUMMARY.match(q)


def _clean(text: str) -> str:
    """Strip the commonest reST markup (roles, literals) from docstring text."""
    return _ROLE.sub(r"\1", text).replace("``", "").replace("`", "")


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def _norm(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))
