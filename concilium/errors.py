"""The one exception tree of concilium.

::

    ConciliumError
    ├── InvalidInput                bad input from a caller (HTTP 400, CLI exit 2)
    │   ├── SpecError               an ExpertSpec / config that does not validate
    │   ├── AdapterRejected         an adapter directory that fails the security checks
    │   ├── UnsafeURL               a remote URL that is not http(s) or points at a forbidden host
    │   └── UnknownModel            a `model` field that names no expert, router or adapter
    ├── ConfigError                 the service configuration is wrong or a dependency is missing
    ├── NotFound                    a named thing does not exist (HTTP 404)
    │   ├── ExpertNotFound
    │   └── RouterNotFound
    ├── Conflict                    the thing exists already (HTTP 409)
    ├── ObjectiveUnsatisfiable      no expert meets the objective (HTTP 422, names the field)
    ├── Unauthorized                missing or wrong API key (HTTP 401)
    ├── ExpertFailed                an expert could not answer (HTTP 502)
    │   ├── ExpertTimeout           it ran past its deadline (HTTP 504)
    │   └── ExpertUnavailable       it cannot be reached or is overloaded (HTTP 503)
    └── RegistryError               the store itself failed (HTTP 500, never for bad input)
        └── RegistryUnavailable     the service that writes it cannot be reached (HTTP 503)

HTTP status codes are assigned in exactly one place: ``concilium.orchestrator.http``.
Every error carries a human message naming the bad value; errors about one request field also carry
``field`` so the HTTP layer can report it.
"""

from __future__ import annotations


class ConciliumError(Exception):
    """Base of every error concilium raises on purpose."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message


class InvalidInput(ConciliumError):
    """The caller sent something that cannot be accepted."""


class SpecError(InvalidInput):
    """An ExpertSpec or configuration file does not validate."""


class AdapterRejected(InvalidInput):
    """An adapter directory failed validation (format, safety, shapes, size)."""


class UnsafeURL(InvalidInput):
    """A remote expert URL is not http(s) or targets a forbidden address."""


class UnknownModel(InvalidInput):
    """The request's `model` names nothing that is registered."""


class ConfigError(ConciliumError):
    """The service configuration (YAML, environment) is wrong or incomplete."""


class NotFound(ConciliumError):
    """A named object does not exist."""


class ExpertNotFound(NotFound):
    """No expert of that name is registered."""


class RouterNotFound(NotFound):
    """No router of that name is configured."""


class Conflict(ConciliumError):
    """The object exists already."""


class ObjectiveUnsatisfiable(ConciliumError):
    """No candidate satisfies the request's objective; `field` names the binding constraint."""


class Unauthorized(ConciliumError):
    """A missing or wrong API key."""


class ExpertFailed(ConciliumError):
    """An expert could not produce an answer."""


class ExpertTimeout(ExpertFailed):
    """An expert ran past its deadline."""


class ExpertUnavailable(ExpertFailed):
    """An expert cannot be reached, or refused the request for load (`retry_after_s` if known)."""

    def __init__(
        self, message: str, *, field: str | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message, field=field)
        self.retry_after_s = retry_after_s


class RegistryError(ConciliumError):
    """The registry store failed (I/O, corruption); never raised for bad input."""


class RegistryUnavailable(RegistryError):
    """The service that writes the registry cannot be reached now (restarting, redeployed); the
    write did not happen or its outcome is unknown, and may be retried (`retry_after_s`)."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
