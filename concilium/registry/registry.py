"""The registry façade: validate → build routing artifacts → store, in one call, no retraining.

``Registry.register`` is the only write path. It validates the spec and its files (safetensors only,
strict adapter config, shapes against the base, safe URLs), copies adapter files into the
content-addressed artifact store, embeds the pilot examples and description, records a cost profile,
and inserts the row, bumping the registry version. If any step fails the SQLite registry is
unchanged.

A lora whose spec carries ``train_examples`` also gets a PHATGOOSE gate: registration queues its
training (adapter frozen, its own examples only) on a background thread and returns at once; when
the gate is stored the row gains an artifact ``phatgoose`` and the registry version is bumped
again, so every cache refreshes. Nothing else is touched: no other adapter's gate changes.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from concilium.errors import AdapterRejected, ExpertNotFound, InvalidInput, SpecError
from concilium.registry.artifacts import artifacts_at
from concilium.registry.gate_jobs import JobQueue
from concilium.registry.index import (
    PilotIndex,
    TextEncoder,
    TokenEncoder,
    encode_texts,
    pack_tokens,
)
from concilium.registry.mirror import MirrorStore
from concilium.registry.specs import MAX_TEXT, LoraSpec, ModelSpec, RemoteSpec, parse_spec
from concilium.registry.store import AnySpec, ExpertRecord, RegistryStore, store_at

log = logging.getLogger(__name__)

# (spec, directory holding its runtime files or None) -> {"latency_ms_per_token": .., ...}
Profiler = Callable[[AnySpec, Path | None], dict[str, float]]
# a validated, stored adapter dir -> its token-routing arrays ({module: prototype [D]})
AdapterRouting = Callable[[Path], dict[str, np.ndarray]]
# (base model dir, stored adapter dir, [(prompt, completion)], stop) -> gates {module: [D]};
# once stop() is true the trainer should return early (its result is discarded)
GateTrainer = Callable[
    [Path, Path, list[tuple[str, str]], Callable[[], bool]], dict[str, np.ndarray]
]
# token router -> the artifact key holding its per-adapter vectors
ROUTER_ARTIFACTS = {"arrow": "arrow", "phatgoose": "phatgoose"}
MAX_PILOTS = 128  # pilot embeddings kept per expert (examples first, then training prompts)


@dataclass(frozen=True, slots=True)
class RegistryLimits:
    """Caps applied at registration."""

    max_rank: int = 64
    max_adapter_bytes: int = 256 * 1024**2
    max_model_bytes: int = 8 * 1024**3
    model_root: Path | None = None  # when set, model dirs must live under it
    allow_private_urls: bool = True


class Registry:
    """Registered experts: a SQLite store, an artifact store, and the encoder for pilots."""

    def __init__(
        self,
        home: Path,
        encoder: TextEncoder,
        *,
        profiler: Profiler | None = None,
        limits: RegistryLimits | None = None,
        adapter_routing: AdapterRouting | None = None,
        gate_trainer: GateTrainer | None = None,
        store: RegistryStore | MirrorStore | None = None,
    ) -> None:
        self.home = Path(home)
        # the SQLite file under home, or a mirror of it fed by the process that owns it
        self.store: RegistryStore | MirrorStore = store if store is not None else store_at(home)
        self.artifacts = artifacts_at(self.home)
        self.encoder = encoder
        self.profiler = profiler
        self.adapter_routing = adapter_routing  # token-routing artifacts of a lora (Arrow)
        self.gate_trainer = gate_trainer  # a lora's PHATGOOSE gate, trained in the background
        self.limits = limits or RegistryLimits()
        self.jobs = JobQueue(self._train_gate)
        self._tokens: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # embeddings ref -> tokens

    # -- reads -------------------------------------------------------------------------------
    def version(self) -> int:
        return self.store.version()

    def get(self, name: str) -> ExpertRecord:
        return self.store.get(name)

    def list(self) -> builtins.list[ExpertRecord]:
        return self.store.list()

    def runtime_path(self, record: ExpertRecord) -> Path | None:
        """Directory with the files an expert runs from (adapter copy or model dir)."""
        if isinstance(record.spec, LoraSpec):
            return self.artifacts.path(record.artifacts["adapter"])
        if isinstance(record.spec, ModelSpec):
            return Path(record.spec.path)
        return None

    def token_routing(self, record: ExpertRecord, router: str = "arrow") -> dict[str, np.ndarray]:
        """A lora's vectors for a token router (Arrow prototypes, PHATGOOSE gates), ``{module:
        [D]}``; empty when it has none (yet)."""
        path = self.router_artifact(record, router)
        return self.artifacts.load_arrays(path.name) if path else {}

    def router_artifact(self, record: ExpertRecord, router: str) -> Path | None:
        """The file of a lora's vectors for ``router`` (what ``TokenRoutingParams.vectors``
        carries to the replicas), or None: not a lora, or its gate is not trained (yet)."""
        ref = record.artifacts.get(ROUTER_ARTIFACTS.get(router, ""))
        return self.artifacts.path(ref) if ref else None

    def embeddings(self, record: ExpertRecord) -> dict[str, np.ndarray]:
        """{"pilots": [P, dim], "description": [1, dim]} for one expert."""
        return self.artifacts.load_arrays(record.artifacts["embeddings"])

    def pilot_tokens(
        self, record: ExpertRecord, emb: Mapping[str, np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """(token embeddings [sum m, dim] float32, offsets [P + 1]) of an expert's pilots, or
        None when the encoder gives no token embeddings. `emb`: the record's `embeddings()`, when
        already loaded. An expert registered before they were stored has them computed once from
        its pilot texts. Kept per embeddings artifact until `retain_tokens` drops it."""
        ref = record.artifacts["embeddings"]
        if ref in self._tokens:
            return self._tokens[ref]
        emb = self.embeddings(record) if emb is None else emb
        if "pilot_tokens" in emb:
            got = (emb["pilot_tokens"].astype(np.float32), emb["pilot_token_offsets"])
        elif isinstance(self.encoder, TokenEncoder):
            fresh = self._embed(record.spec)
            got = (fresh["pilot_tokens"].astype(np.float32), fresh["pilot_token_offsets"])
        else:
            return None
        if not _segments_ok(got[1], len(emb["pilots"]), len(got[0])):
            log.warning("expert %s: pilot token embeddings do not match its pilots", record.name)
            return None
        self._tokens[ref] = got
        return got

    def retain_tokens(self, records: builtins.list[ExpertRecord]) -> None:
        """Forget the pilot tokens of every expert not in `records` (deleted, re-registered)."""
        keep = {r.artifacts["embeddings"] for r in records}
        for ref in [r for r in self._tokens if r not in keep]:
            del self._tokens[ref]

    def build_index(self, records: builtins.list[ExpertRecord]) -> PilotIndex:
        """A fresh pilot index over `records` (derived state: nothing is orphaned by removal)."""
        index = PilotIndex(self.encoder.dim)
        for rec in records:
            pilots = self.embeddings(rec)["pilots"]
            if len(pilots):
                index.add(rec.name, pilots)
        return index

    # -- writes ------------------------------------------------------------------------------
    def register(
        self, data: Mapping[str, Any] | AnySpec, *, base_dir: Path | None = None
    ) -> ExpertRecord:
        """Validate and add one expert. `base_dir` resolves relative paths in the spec."""
        spec = data if isinstance(data, ModelSpec | LoraSpec | RemoteSpec) else parse_spec(data)
        spec = _absolutise(spec, base_dir)
        if self._exists(spec.name):
            from concilium.errors import Conflict

            raise Conflict(f"expert {spec.name!r} is already registered", field="name")
        _check_train_examples(spec)
        artifacts, runtime_dir = self._validate_and_copy(spec)
        if isinstance(spec, ModelSpec) and runtime_dir is not None:
            # the directory checked, not a path through symlinks that may be repointed later
            spec = spec.model_copy(update={"path": str(runtime_dir)})
        artifacts["embeddings"] = self.artifacts.put_arrays(self._embed(spec))
        if isinstance(spec, LoraSpec) and runtime_dir is not None and self.adapter_routing:
            artifacts["arrow"] = self.artifacts.put_arrays(self.adapter_routing(runtime_dir))
        artifacts["profile"] = self._profile(spec, runtime_dir)
        record = self.store.add(spec, artifacts)
        log.info(
            "registered expert %s (%s) at registry version %d", spec.name, spec.kind, record.version
        )
        if self._wants_gate(record):
            self.jobs.submit(spec.name)
        return record

    def remove(self, name: str) -> int:
        """Remove an expert; returns the new registry version."""
        return self.store.remove(name)

    # -- PHATGOOSE gates (background) ---------------------------------------------------------
    def wait_for_gates(self, timeout: float | None = None) -> bool:
        """Block until every queued gate training is done; False on timeout."""
        return self.jobs.wait(timeout)

    def train_pending_gates(self) -> builtins.list[str]:
        """Queue the gates a previous process did not finish (none failed); returns their names."""
        names = [r.name for r in self.list() if self._wants_gate(r)]
        for name in names:
            self.jobs.submit(name)
        return names

    def _wants_gate(self, record: ExpertRecord) -> bool:
        a = record.artifacts
        return (
            self.gate_trainer is not None
            and isinstance(record.spec, LoraSpec)
            and bool(record.spec.train_examples)
            and "adapter" in a
            and "phatgoose" not in a
            and "phatgoose_error" not in a
        )

    def _train_gate(self, name: str) -> None:
        """Train one lora's gate from its stored adapter and its own examples; store it."""
        try:
            rec = self.store.get(name)
        except ExpertNotFound:
            return  # removed while queued
        if not self._wants_gate(rec):
            return
        assert isinstance(rec.spec, LoraSpec) and self.gate_trainer is not None
        base = self.store.get(rec.spec.base).spec
        assert isinstance(base, ModelSpec)
        examples = [(e["prompt"], e["completion"]) for e in rec.spec.train_examples]
        adapter = self.artifacts.path(rec.artifacts["adapter"])
        stop = self.jobs.stopping.is_set
        try:
            gates = self.gate_trainer(Path(base.path), adapter, examples, stop)
        except Exception as e:
            log.exception("PHATGOOSE gate of %s failed", name)
            self._set_artifact(rec, "phatgoose_error", f"{type(e).__name__}: {e}")
            return
        if stop():
            return  # cut short at exit: train_pending_gates picks it up next time
        version = self._set_artifact(rec, "phatgoose", self.artifacts.put_arrays(gates))
        log.info("PHATGOOSE gate of %s stored at registry version %s", name, version)

    def _set_artifact(self, rec: ExpertRecord, key: str, value: Any) -> int | None:
        """Add one artifact to a stored row and bump the version; None if the row changed
        (removed, or re-registered, with the same adapter or another) meanwhile."""
        return self.store.update_artifacts(
            rec.name,
            {key: value},
            expect={"adapter": rec.artifacts["adapter"]},
            expect_version=rec.version,
        )

    def gc(self, grace_s: float = 600.0) -> builtins.list[str]:
        """Drop artifacts no registered expert refers to (older than `grace_s` seconds)."""
        return self.artifacts.gc(referenced(self.list()), grace_s=grace_s)

    # -- steps ------------------------------------------------------------------------------
    def _exists(self, name: str) -> bool:
        try:
            self.store.get(name)
        except ExpertNotFound:
            return False
        return True

    def _validate_and_copy(self, spec: AnySpec) -> tuple[dict[str, Any], Path | None]:
        from concilium.registry import validate as v

        lim = self.limits
        if isinstance(spec, RemoteSpec):
            with _blame("url"):
                v.validate_remote_url(spec.url, allow_private=lim.allow_private_urls)
            return {}, None
        if isinstance(spec, ModelSpec):
            with _blame("path"):
                info = v.validate_model_dir(
                    Path(spec.path), max_bytes=lim.max_model_bytes, allowed_root=lim.model_root
                )
            return {
                "model": {"model_type": info.model_type, "num_params": info.num_params}
            }, info.path
        base = self._base_of(spec).spec
        assert isinstance(base, ModelSpec)
        with _blame("base"):
            base_info = v.validate_model_dir(
                Path(base.path), max_bytes=lim.max_model_bytes, allowed_root=lim.model_root
            )

        def check(path: Path) -> v.AdapterInfo:
            with _blame("path"):
                return v.validate_adapter_dir(
                    path, base_info, max_rank=lim.max_rank, max_bytes=lim.max_adapter_bytes
                )

        ainfo = check(Path(spec.path))
        ref = self.artifacts.put_files({f: ainfo.path / f for f in ainfo.files})
        try:  # validate the stored copy too: the source may have changed after the first check
            ainfo = check(self.artifacts.path(ref))
        except AdapterRejected:
            if not any(r.artifacts.get("adapter") == ref for r in self.list()):
                self.artifacts.discard(ref)  # the same content may be another expert's adapter
            raise
        meta = {
            "rank": ainfo.rank,
            "alpha": ainfo.alpha,
            "num_params": ainfo.num_params,
            "target_modules": list(ainfo.target_modules),
        }
        return {"adapter": ref, "lora": meta}, self.artifacts.path(ref)

    def _base_of(self, spec: LoraSpec) -> ExpertRecord:
        try:
            base = self.store.get(spec.base)
        except ExpertNotFound:
            raise SpecError(
                f"base {spec.base!r} of adapter {spec.name!r} is not a registered expert",
                field="base",
            ) from None
        if not isinstance(base.spec, ModelSpec):
            raise SpecError(
                f"base {spec.base!r} is a {base.spec.kind} expert, not a model", field="base"
            )
        if base.spec.task != spec.task:
            raise SpecError(
                f"adapter task {spec.task!r} differs from base task {base.spec.task!r}",
                field="task",
            )
        return base

    def _embed(self, spec: AnySpec) -> dict[str, np.ndarray]:
        """{"pilots": [P, dim], "description": [1, dim]}, and with an encoder that gives token
        embeddings also "pilot_tokens" [sum m, dim] (float16) and "pilot_token_offsets" [P + 1]
        for the retriever's late interaction."""
        desc = spec.description or spec.name
        texts = pilot_texts(spec)
        vecs, tokens = encode_texts(self.encoder, [desc, *texts])  # [1 + P, dim]
        out = _pilot_arrays(vecs, texts)
        if tokens is None:
            return out
        flat, offsets = pack_tokens(tokens[1:] if texts else tokens[:1])
        return out | {"pilot_tokens": flat.astype(np.float16), "pilot_token_offsets": offsets}

    def _profile(self, spec: AnySpec, runtime_dir: Path | None) -> dict[str, Any]:
        profile: dict[str, Any] = {
            "measured": False,
            "params_total": spec.params_total,
            "params_active": spec.params_active,
            "price_in_per_1k": spec.price_in_per_1k,
            "price_out_per_1k": spec.price_out_per_1k,
        }
        if isinstance(spec, LoraSpec):
            profile.update(
                {
                    k: v
                    for k, v in self.store.get(spec.base).artifacts["profile"].items()
                    if k.startswith("latency")
                }
            )
            profile["inherited_from"] = spec.base
        elif self.profiler is not None and spec.task == "generate":
            profile.update(self.profiler(spec, runtime_dir))
            profile["measured"] = True
        return profile


def _segments_ok(offsets: np.ndarray, pilots: int, tokens: int) -> bool:
    """Offsets [P + 1] from 0 to `tokens`, every pilot with at least one token."""
    return (
        offsets.shape == (pilots + 1,)
        and int(offsets[0]) == 0
        and int(offsets[-1]) == tokens
        and bool(np.all(np.diff(offsets) > 0))
    )


def _pilot_arrays(vecs: np.ndarray, texts: list[str]) -> dict[str, np.ndarray]:
    pilots = vecs[1:] if texts else vecs[:1]  # no pilots: the description stands in
    return {"pilots": pilots.astype(np.float32), "description": vecs[:1].astype(np.float32)}


def pilot_texts(spec: AnySpec | Mapping[str, Any], cap: int = MAX_PILOTS) -> list[str]:
    """The queries whose embeddings represent an expert: its pilots, then its training prompts.

    A spec's ``examples`` always come first; the distinct prompts of its ``train_examples`` (the
    adapter's own training queries) widen the set of phrasings the retriever has seen, spread
    evenly over the list, up to ``cap`` texts in all. Duplicates are dropped. Takes a parsed spec
    or a spec dict (the evaluation harness reads pack manifests).
    """
    if isinstance(spec, Mapping):
        examples, train = spec.get("examples") or [], spec.get("train_examples") or []
    else:
        examples, train = spec.examples, spec.train_examples
    out = list(dict.fromkeys(examples))
    seen = set(out)
    extra = [p for p in dict.fromkeys(e["prompt"] for e in train) if p not in seen]
    room = max(cap - len(out), 0)
    if len(extra) > room:
        extra = [extra[i * len(extra) // room] for i in range(room)] if room else []
    return out + extra


_REF_KEYS = ("adapter", "embeddings", "arrow", "phatgoose")


def referenced(records: Iterable[ExpertRecord]) -> set[str]:
    """The artifact refs the given rows use (what `ArtifactStore.gc` must keep)."""
    return {v for r in records for k, v in r.artifacts.items() if k in _REF_KEYS}


@contextmanager
def _blame(field: str) -> Iterator[None]:
    """A validation step's errors that name no field name `field`, the spec field it checks."""
    try:
        yield
    except InvalidInput as e:
        if e.field is None:
            e.field = field
        raise


def _check_train_examples(spec: AnySpec) -> None:
    """Gate-training data is ``{"prompt": str, "completion": str}`` pairs, nothing else."""
    for i, e in enumerate(spec.train_examples):
        if set(e) != {"prompt", "completion"} or not e["prompt"] or not e["completion"]:
            raise SpecError(
                f"train_examples[{i}] must have exactly a non-empty 'prompt' and 'completion' "
                f"(got keys {sorted(e)})",
                field=f"train_examples.{i}",
            )
        if max(len(e["prompt"]), len(e["completion"])) > MAX_TEXT:
            raise SpecError(
                f"train_examples[{i}]: prompt and completion are at most {MAX_TEXT} characters",
                field=f"train_examples.{i}",
            )


def _absolutise(spec: AnySpec, base_dir: Path | None) -> AnySpec:
    """Resolve a relative `path` against base_dir (or the cwd)."""
    if isinstance(spec, ModelSpec | LoraSpec):
        try:
            p = Path(spec.path).expanduser()
        except RuntimeError:  # "~user/..." naming no user, or no home directory to expand "~"
            raise SpecError(
                f"path {spec.path!r}: cannot expand '~' (no such user or home directory)",
                field="path",
            ) from None
        if not p.is_absolute():
            p = (base_dir or Path.cwd()) / p
        return spec.model_copy(update={"path": str(p.absolute())})
    return spec
