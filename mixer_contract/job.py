"""The job document: which sources are mixed, in what role, with what shapes, seed and epoch order.

``JobConfig.parse`` is the one validation of a job (the HTTP layer's schema is generated from the same
bounds), and ``to_json`` the one canonical form: the bytes version 1 of the schedule chain commits to.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from mixer_contract.errors import InvalidInput
from mixer_contract.values import GLOBAL_BATCH, SEED, SEQ_LEN, TOTAL_STEPS

ROLES = ("repeat", "once")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # a source's name
JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_SOURCES = 256  # the exact-mixture bound grows as ceil(log2 K)/2 rows; 256 keeps it at 4
DEFAULT_WINDOW_SHARDS = 16  # see docs/epoch_order.md for the measurement behind it
MAX_WINDOW_SHARDS = 1 << 20
ORDER_KINDS = ("global", "window", "sliding")


@dataclass(frozen=True)
class OrderSpec:
    """A job's ``order`` option: ``{"kind": "sliding", "window_shards": W}`` (what new jobs get),
    ``{"kind": "window", "window_shards": W}`` (what new jobs got before issue 18) or ``{"kind": "global"}``
    (what a stored config without the key means: every job before issue 10)."""

    kind: str = "global"
    window_shards: int = 0  # only for the shard-local kinds ("window", "sliding")

    @classmethod
    def parse(cls, data: Any) -> OrderSpec:
        if data is None:
            return cls()
        if not isinstance(data, dict) or data.get("kind") not in ORDER_KINDS:
            raise InvalidInput(f"order.kind: must be one of {list(ORDER_KINDS)}, got {str(data)[:80]}")
        allowed = {"kind"} if data["kind"] == "global" else {"kind", "window_shards"}
        if set(data) - allowed:
            raise InvalidInput(f"order: unknown field(s) {sorted(set(data) - allowed)}")
        if data["kind"] == "global":
            return cls()
        w = data.get("window_shards", DEFAULT_WINDOW_SHARDS)
        if isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= MAX_WINDOW_SHARDS:
            raise InvalidInput(f"order.window_shards: must be an integer in [1, {MAX_WINDOW_SHARDS}], "
                               f"got {w!r}")
        return cls(data["kind"], w)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind} if self.kind == "global" else {
            "kind": self.kind, "window_shards": self.window_shards}


@dataclass(frozen=True)
class SourceSpec:
    name: str
    role: str  # "repeat": consumed in epochs (domain set); "once": a single pass (web)
    fingerprint: str | None = None  # content fingerprint the job was created against
    root: str | None = None  # Merkle root of the source's hashes at job creation (None: an older job)


@dataclass(frozen=True)
class JobConfig:
    sources: tuple[SourceSpec, ...]
    seq_len: int
    global_batch: int
    seed: int
    total_steps: int
    allow_wrap: bool = False  # let a "once" source start a second pass instead of refusing the schedule
    order: OrderSpec = OrderSpec()  # epoch order of every source (docs/epoch_order.md)

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    @classmethod
    def parse(cls, data: Any) -> JobConfig:
        """Validate a job document; every error names the offending field."""
        if not isinstance(data, dict):
            raise InvalidInput("job: must be an object")
        unknown = set(data) - {"sources", "seq_len", "global_batch", "seed", "total_steps", "allow_wrap",
                               "order"}
        if unknown:
            raise InvalidInput(f"job: unknown field(s) {sorted(unknown)}")
        raw_sources = data.get("sources")
        if not isinstance(raw_sources, list) or not 1 <= len(raw_sources) <= MAX_SOURCES:
            raise InvalidInput(f"sources: must be a list of 1 to {MAX_SOURCES} sources")
        sources = []
        for i, raw in enumerate(raw_sources):
            where = f"sources[{i}]"
            if not isinstance(raw, dict):
                raise InvalidInput(f"{where}: must be an object with name and role")
            name, role, fp, root = raw.get("name"), raw.get("role"), raw.get("fingerprint"), raw.get("root")
            if not isinstance(name, str) or not NAME_PATTERN.match(name):
                raise InvalidInput(f"{where}.name: must match {NAME_PATTERN.pattern}, got {name!r}")
            if role not in ROLES:
                raise InvalidInput(f"{where}.role: must be one of {list(ROLES)}, got {role!r}")
            if fp is not None and not isinstance(fp, str):
                raise InvalidInput(f"{where}.fingerprint: must be a string")
            if root is not None and not isinstance(root, str):
                raise InvalidInput(f"{where}.root: must be a string")
            if set(raw) - {"name", "role", "fingerprint", "root"}:
                raise InvalidInput(
                    f"{where}: unknown field(s) {sorted(set(raw) - {'name', 'role', 'fingerprint', 'root'})}"
                )
            sources.append(SourceSpec(name, role, fp, root))
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise InvalidInput(f"sources: names must be unique, got {names}")
        ints = {}
        for bounds in (SEQ_LEN, GLOBAL_BATCH, SEED, TOTAL_STEPS):
            ints[bounds.name] = bounds.check(data.get(bounds.name, 0 if bounds is SEED else None))
        allow_wrap = data.get("allow_wrap", False)
        if not isinstance(allow_wrap, bool):
            raise InvalidInput("allow_wrap: must be true or false")
        return cls(tuple(sources), allow_wrap=allow_wrap, order=OrderSpec.parse(data.get("order")), **ints)

    @classmethod
    def parse_new(cls, data: Any) -> JobConfig:
        """A job being created: without an ``order`` it gets the sliding order (a bounded shard cache then
        reads each shard once per epoch, and the first step reads one shard per source,
        docs/epoch_order.md), written into its stored config so the document says which order decides its
        bytes. A config stored before, without the key, keeps the global order it was served under, and one
        stored with the window order keeps that: ``parse`` never changes a stored job's bytes."""
        if isinstance(data, dict) and "order" not in data:
            data = data | {"order": {"kind": "sliding", "window_shards": DEFAULT_WINDOW_SHARDS}}
        return cls.parse(data)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["sources"] = [{k: v for k, v in asdict(s).items() if v is not None} for s in self.sources]
        out.pop("order")
        if self.order != OrderSpec():  # a default job's document (and anything hashed from it) is unchanged
            out["order"] = self.order.to_json()
        return out
