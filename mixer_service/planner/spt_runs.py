"""Pilot-run measurements for the overfitting law, read from CSV or trainer JSONL logs.

Pilot runs are the only evidence the δ recommendation rests on, so loading is strict: every kept row needs
tokens, δ and a domain loss, and a bad value is reported with its file and line.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixer_contract.errors import InvalidInput

TOKENS_KEYS = ("tokens", "T", "tokens_seen", "train_tokens", "consumed_tokens")
DELTA_KEYS = ("delta", "δ", "domain_fraction", "domain_weight")
LOSS_KEYS = ("domain_loss", "domain_test_loss", "domain_val_loss", "val_domain_loss", "eval_domain_loss")
TRAIN_LOSS_KEYS = ("domain_train_loss",)
MAX_LOSS = 1e3  # nats per token: above it a value is not a language-model loss (e^1000 perplexity)


@dataclass(frozen=True)
class SptRuns:
    """Domain loss measured at ``tokens`` pretraining tokens with domain fraction ``delta``.

    ``train_loss`` (domain *training-set* loss) is optional; with it the fit separates L_train from L_gap
    as the paper does, without it only their sum L_test is observed. ``where`` names each row's origin
    (``file:line`` or ``runs[i]``) for error messages.
    """

    tokens: np.ndarray
    delta: np.ndarray
    loss: np.ndarray
    train_loss: np.ndarray | None = None
    where: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("tokens", "delta", "loss", "train_loss"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, np.asarray(value, dtype=float).ravel())
        n = self.tokens.size
        arrays = {"tokens": self.tokens, "delta": self.delta, "domain_loss": self.loss}
        if self.train_loss is not None:
            arrays["domain_train_loss"] = self.train_loss
        if self.where is not None and len(self.where) != n:
            raise InvalidInput(f"{len(self.where)} row labels for {n} rows")
        for name, arr in arrays.items():
            if arr.size != n:
                raise InvalidInput(f"column {name} has {arr.size} values, expected {n}")
            self.refuse(name, ~np.isfinite(arr), "has a non-finite value (NaN or inf)")
        if n == 0:
            raise InvalidInput("no run measurements given")
        self.refuse("tokens", self.tokens <= 0, "must be > 0")
        self.refuse("delta", (self.delta < 0) | (self.delta > 1), "must lie in [0, 1] (a fraction)")
        for name, arr in (("domain_loss", self.loss), ("domain_train_loss", self.train_loss)):
            if arr is not None:
                self.refuse(name, arr <= 0, "must be > 0 (domain_loss and domain_train_loss must be > 0)")
                self.refuse(name, arr > MAX_LOSS,
                             f"must be <= {MAX_LOSS:g}: a per-token loss (nats or bits), not a perplexity")

    def refuse(self, name: str, bad: np.ndarray, why: str) -> None:
        """Raise naming the first bad row, so one value that would break the fit is found in its file."""
        if bad.any():
            i = int(np.argmax(bad))
            column = {"domain_loss": "loss", "domain_train_loss": "train_loss"}.get(name, name)
            raise InvalidInput(f"{name} {why}: {self.label(i)} has {getattr(self, column)[i]:g}")

    def label(self, i: int) -> str:
        return f"row {i}" if self.where is None else self.where[i]

    @property
    def deltas(self) -> np.ndarray:
        """Distinct δ values, ascending."""
        return np.unique(self.delta)


def load_runs(
    paths: Sequence[str | Path],
    tokens_key: str | None = None,
    delta_key: str | None = None,
    loss_key: str | None = None,
) -> SptRuns:
    """Read pilot measurements from CSV files and/or JSONL logs (``.jsonl``/``.json``).

    JSONL records without a domain loss (e.g. per-step training records) are skipped; a δ given once in
    a file (e.g. in a config record) carries forward to the records after it. ``*_key`` override the
    column names when a log uses its own.
    """
    if not paths:
        raise InvalidInput("no run files given")
    keys = (
        (tokens_key,) if tokens_key else TOKENS_KEYS,
        (delta_key,) if delta_key else DELTA_KEYS,
        (loss_key,) if loss_key else LOSS_KEYS,
    )
    rows: list[tuple[float, float, float, float | None, str]] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise InvalidInput(f"run file not found: {path}")
        records = _jsonl_records(path) if path.suffix in (".jsonl", ".json") else _csv_records(path)
        rows.extend(_rows(path, records, *keys))
    if not rows:
        raise InvalidInput(
            f"no rows with tokens, delta and a domain loss ({'/'.join(keys[2])}) in {list(paths)}"
        )
    has_train = [r[3] is not None for r in rows]
    arr = np.array([r[:3] for r in rows], dtype=float)
    train = np.array([r[3] for r in rows], dtype=float) if all(has_train) else None
    return SptRuns(tokens=arr[:, 0], delta=arr[:, 1], loss=arr[:, 2], train_loss=train,
                   where=tuple(r[4] for r in rows))


def _csv_records(path: Path) -> Iterable[tuple[int, dict]]:
    with path.open(newline="") as f:
        for line_no, record in enumerate(csv.DictReader(f), start=2):
            yield line_no, {k.strip(): v for k, v in record.items() if k is not None and v not in (None, "")}


def _jsonl_records(path: Path) -> Iterable[tuple[int, dict]]:
    with path.open() as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidInput(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if isinstance(record, dict):
                yield line_no, record


def _rows(
    path: Path,
    records: Iterable[tuple[int, dict]],
    tokens_keys: tuple[str, ...],
    delta_keys: tuple[str, ...],
    loss_keys: tuple[str, ...],
) -> Iterable[tuple[float, float, float, float | None, str]]:
    current_delta: float | None = None
    for line_no, record in records:
        where = f"{path}:{line_no}"
        delta = _pick(record, delta_keys, where)
        if delta is not None:
            current_delta = delta
        loss = _pick(record, loss_keys, where)
        if loss is None:
            continue
        tokens = _pick(record, tokens_keys, where)
        if tokens is None:
            raise InvalidInput(f"{where}: domain loss without a token count ({'/'.join(tokens_keys)})")
        if current_delta is None:
            raise InvalidInput(f"{where}: domain loss without a domain fraction ({'/'.join(delta_keys)})")
        yield tokens, current_delta, loss, _pick(record, TRAIN_LOSS_KEYS, where), where


def _pick(record: dict, keys: tuple[str, ...], where: str) -> float | None:
    for key in keys:
        if key in record and record[key] is not None:
            try:
                return float(record[key])
            except (TypeError, ValueError):
                raise InvalidInput(f"{where}: {key}={record[key]!r} is not a number") from None
    return None
