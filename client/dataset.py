"""The trainer-side data loader: the service's batches as torch tensors, prefetched in order, resumable.

Each served row holds ``seq_len`` tokens and becomes ``input_ids = row[:-1]``, ``labels = row[1:]``, so
the model's context length is ``seq_len - 1``. Since a batch is a pure function of (job, step, rank,
world), resuming needs only the next step: ``state_dict()`` is ``{"next_step", "job", "incarnation",
"log_chain"}``, plain values a ``torch.load(weights_only=True)`` checkpoint can hold. ``log_chain`` pins each
step range received to the schedule history it was computed under (``client.history``): a later answer for
one of those steps under another history stops the loader with ``HistoryRewritten``.

Rank and world come, in this order, from the arguments, an initialised process group, or ``RANK`` /
``WORLD_SIZE`` (set by torchrun, as mosaicml-streaming reads them), so a loader built before
``init_process_group`` still gets its own slice; where two of them disagree the loader refuses to start.
"""

from __future__ import annotations

import os
import weakref
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from client.errors import ClientRequestError, JobReplaced
from client.history import LogPins
from client.http import MixerClient
from mixer_contract.values import STEPS
from mixer_contract.wire import WireBatch

THREAD_PREFIX = "mixer-prefetch"
_MAX_WORKERS = 4  # requests are I/O-bound; a few in flight hide latency, more only load the service
STEPS_PER_REQUEST = 8  # the fixed costs of a request (HTTP, framing, the server's head read), over 8 steps
_REQUEST_TOKENS = 1 << 20  # fewer steps a request when they hold more: the fixed costs are then a few %


class MixerLoader:
    """One rank's slice of a job's steps ``[start_step, end_step)``: the trainer's ``BatchSource``.

    Yields ``{"input_ids", "labels": LongTensor[b, seq_len - 1], "source_ids": LongTensor[b], "step": int,
    "sources": list[str]}`` (``source_ids`` index ``sources``). Up to ``prefetch`` steps are fetched ahead by
    a small thread pool and handed out strictly in step order; a fetch that failed (after the client's
    retries) raises in the consumer at that step, and the next call retries that same step. A request asks
    for up to ``steps_per_request`` consecutive steps (docs/protocol.md), so its fixed costs on both ends
    are paid once for them: the first request after a start asks for one (the first batch comes as soon as
    it can), and fewer are asked for when they would hold over 2^20 tokens or the server answers with fewer
    (one that predates the option, or a 413 from its ``--max-request-tokens``). The last step of a request
    is marked served when it arrives, so a schedule change takes effect up to ``prefetch +
    steps_per_request - 1`` steps after the one being trained. ``rank`` and
    ``world`` default to the process group, else ``RANK``/``WORLD_SIZE``, else 0 and 1 (see
    ``data_parallel_position``). ``end_step`` defaults to the job's ``total_steps``.

    ``boundaries=True`` asks the service for document boundaries and adds ``position_ids``
    (LongTensor[b, seq_len - 1], restarting at 0 where a document piece starts) and ``cu_seqlens``
    (IntTensor[pieces + 1], cumulative piece lengths over the flattened batch, as flash-attention's varlen
    kernels take them) plus ``max_seqlen`` (int).
    """

    def __init__(self, client_or_urls: MixerClient | str | list[str], job: str, start_step: int = 0,
                 end_step: int | None = None, rank: int | None = None, world: int | None = None,
                 prefetch: int = 4, pin_memory: bool = False, token: str | None = None,
                 compression: str = "zstd", boundaries: bool = False,
                 steps_per_request: int = STEPS_PER_REQUEST) -> None:
        self.rank, self.world = data_parallel_position(rank, world)
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        if not STEPS.low <= steps_per_request <= STEPS.high:
            raise ValueError(f"steps_per_request must be in [{STEPS.low}, {STEPS.high}], "
                             f"got {steps_per_request}")
        owned: MixerClient | None = None
        if isinstance(client_or_urls, MixerClient):
            if token is not None:
                raise ValueError("token: give it to the MixerClient passed in, not to the loader")
            self.client = client_or_urls
        else:
            self.client = owned = MixerClient(client_or_urls, token=token)  # closed with the loader
        self.job, self.end_step, self.prefetch, self.compression = job, end_step, prefetch, compression
        self.boundaries, self.steps_per_request = boundaries, steps_per_request
        self._per_request = 1  # steps the next request asks for: 1 until the first batch arrived
        self._cap = steps_per_request  # lowered to what a server answered when it sent fewer than asked
        self._pin = pin_memory and torch.cuda.is_available()  # pinning needs a CUDA driver; no-op on CPU
        self._incarnation: str | None = None  # of the first batch: every later one must match
        self._pins = LogPins()  # the schedule history each received step was computed under
        self._next_step = start_step  # the next step __next__ returns
        self._submitted = start_step  # the next step to hand to the pool
        self._pending: deque[tuple[int, int, Future[list[dict[str, Any]]]]] = deque()  # first, count, fetch
        self._ready: deque[dict[str, Any]] = deque()  # received batches of _next_step, _next_step + 1, ...
        self._pool = ThreadPoolExecutor(min(prefetch, _MAX_WORKERS), thread_name_prefix=THREAD_PREFIX)
        # also runs when the loader is garbage-collected or the interpreter exits, so threads never leak
        self._finalizer = weakref.finalize(self, _shutdown, self._pool, owned)

    def __iter__(self) -> MixerLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        if not self._finalizer.alive:
            raise RuntimeError("MixerLoader is closed")
        if self.end_step is None:
            self.end_step = int(self.client.job(self.job)["config"]["total_steps"])
        if self._next_step >= self.end_step:
            raise StopIteration
        self._fill()
        if not self._ready:
            first, count, future = self._pending.popleft()
            try:
                batches = future.result()
            except BaseException:
                self._restart(self._next_step)  # drop the look-ahead; the next call fetches this step again
                raise
            self._learn(len(batches), count, batches[0]["input_ids"])
            if len(batches) < count:  # ask again from the first step missing, for as many as it sent
                self._drop_pending(first + len(batches))
            self._ready.extend(batches)
        batch = self._ready.popleft()
        self._check_incarnation(batch.pop("incarnation", None))
        try:
            self._pins.check(self._next_step, batch.pop("log_chain", None), batch.pop("log_since", None))
        except BaseException:
            self._restart(self._next_step)
            raise
        self._next_step += 1
        self._fill()  # keep the pipeline full while the trainer computes on this batch
        return batch

    def report_eval(self, step: int, source: str, loss: float, tokens: int = 0) -> None:
        """Post one held-out loss on ``source`` after data step ``step`` to the job's overfitting watch.

        Goes through the loader's own client (its replicas, token and failover), so a training loop that
        only holds the loader can feed the watch; ``tokens`` is what the trainer counted through ``step``.
        """
        self.client.post_eval(self.job, step, source, loss, tokens)

    def state_dict(self) -> dict[str, Any]:
        """Where to resume: the next step, the job incarnation and the history of the steps received."""
        return {"next_step": self._next_step, "job": self.job, "incarnation": self._incarnation,
                "log_chain": self._pins.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a ``state_dict()``; batches already prefetched are discarded."""
        if state["job"] != self.job:
            raise ValueError(f"state is for job {state['job']!r}, this loader reads {self.job!r}")
        self._incarnation = state.get("incarnation")
        self._pins.load(state.get("log_chain", []))
        self._restart(int(state["next_step"]))

    def _check_incarnation(self, incarnation: str | None) -> None:
        if incarnation is None:
            return
        if self._incarnation is None:
            self._incarnation = incarnation
        elif incarnation != self._incarnation:
            self._restart(self._next_step)
            raise JobReplaced(
                f"job {self.job!r} was deleted and recreated under the same id: step {self._next_step} "
                f"comes from incarnation {incarnation}, this run from {self._incarnation}; start a new run "
                "(or load a checkpoint of the new job) instead of mixing the two",
                expected=self._incarnation, got=incarnation)

    def close(self) -> None:
        """Cancel queued fetches, wait for running ones, stop the threads (idempotent)."""
        self._finalizer()

    def __enter__(self) -> MixerLoader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _learn(self, got: int, asked: int, inputs: torch.Tensor) -> None:
        """Steps a request asks for from now on: ``steps_per_request``, fewer when they would hold over
        ``_REQUEST_TOKENS`` tokens, and no more than a server answered with when it sent fewer than asked."""
        if got < asked:
            self._cap = got
        per_batch = inputs.numel() + inputs.shape[0]  # rows x seq_len
        self._per_request = max(1, min(self._cap, _REQUEST_TOKENS // per_batch))

    def _fill(self) -> None:
        assert self.end_step is not None
        while self._submitted < self.end_step and self._submitted - self._next_step < self.prefetch:
            count = min(self._per_request, self.end_step - self._submitted)
            self._pending.append(self._submit(self._submitted, count))
            self._submitted += count

    def _submit(self, first: int, count: int) -> tuple[int, int, Future[list[dict[str, Any]]]]:
        return first, count, self._pool.submit(_fetch, self.client, self.job, first, count, self.rank,
                                               self.world, self.compression, self._pin, self.boundaries)

    def _drop_pending(self, step: int) -> None:
        """Forget the requests in flight; the next ``_fill`` asks again from ``step``."""
        for _, _, future in self._pending:
            future.cancel()  # queued ones never run; running ones finish and are dropped
        self._pending.clear()
        self._submitted = step

    def _restart(self, step: int) -> None:
        self._drop_pending(step)
        self._ready.clear()
        self._next_step = step


class MixerDataset(IterableDataset[dict[str, Any]]):
    """A ``MixerLoader`` behind torch's ``IterableDataset``, for code built around ``DataLoader``.

    Use ``DataLoader(dataset, batch_size=None, num_workers=0)``: batches arrive already collated, and the
    loader prefetches in threads, so worker processes would only fetch every step once per worker.
    """

    def __init__(self, client_or_urls: MixerClient | str | list[str], job: str, **loader_args: Any) -> None:
        self.client_or_urls, self.job, self.loader_args = client_or_urls, job, loader_args

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if get_worker_info() is not None:
            raise RuntimeError("MixerDataset prefetches in threads; use DataLoader(num_workers=0)")
        with MixerLoader(self.client_or_urls, self.job, **self.loader_args) as loader:
            yield from loader


def data_parallel_position(rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """(rank, world) of this process from the arguments, the process group and ``RANK``/``WORLD_SIZE``.

    Every place that states a value must agree: a loader whose explicit rank contradicts torchrun's
    environment or the initialised group would read another rank's rows (or, with world 1, the whole
    batch on every rank) and train on duplicated data without a sound, so it raises instead.
    """
    stated: dict[str, tuple[int | None, int | None]] = {"argument": (rank, world)}
    if dist.is_available() and dist.is_initialized():
        stated["process group"] = (dist.get_rank(), dist.get_world_size())
    env = tuple(_env_int(name) for name in ("RANK", "WORLD_SIZE"))
    stated["environment (RANK, WORLD_SIZE)"] = (env[0], env[1])
    resolved: list[int] = []
    for index, (name, default) in enumerate((("rank", 0), ("world", 1))):
        given: dict[str, int] = {}
        for origin, values in stated.items():
            value = values[index]
            if value is not None:
                given[origin] = value
        if len(set(given.values())) > 1:
            said = ", ".join(f"{origin} says {value}" for origin, value in given.items())
            raise ValueError(f"{name}: contradictory values ({said}); pass the same one or none")
        resolved.append(next(iter(given.values()), default))
    if not 0 <= resolved[0] < resolved[1]:
        raise ValueError(f"rank must be in [0, world), got rank={resolved[0]} world={resolved[1]}")
    return resolved[0], resolved[1]


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} in the environment is not an integer") from None


def _fetch(client: MixerClient, job: str, step: int, steps: int, rank: int, world: int, compression: str,
           pin: bool, boundaries: bool) -> list[dict[str, Any]]:
    """Runs in a pool thread; a plain function, so pending work never keeps the loader itself alive. A
    request too large for the server (413, its ``--max-request-tokens``) is asked again for half the steps."""
    try:
        batches = client.batches(job, step, steps, rank, world, compression, boundaries=boundaries)
    except ClientRequestError as exc:
        if exc.status != 413 or steps == 1:
            raise
        return _fetch(client, job, step, steps // 2, rank, world, compression, pin, boundaries)
    return [_tensors(batch, pin) | {"step": step + offset} for offset, batch in enumerate(batches)]


def _tensors(batch: WireBatch, pin: bool) -> dict[str, Any]:
    """What the trainer gets for one served batch (the class docstring lists it)."""
    tokens = torch.from_numpy(batch.tokens.astype(np.int64))
    tensors = {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
               "source_ids": torch.from_numpy(batch.source_ids.astype(np.int64))}
    extra: dict[str, Any] = {}
    if batch.boundaries is not None:
        position_ids, cu_seqlens, max_seqlen = document_positions(batch.boundaries, tokens.shape[1] - 1)
        tensors |= {"position_ids": position_ids, "cu_seqlens": cu_seqlens}
        extra["max_seqlen"] = max_seqlen
    if pin:
        tensors = {k: v.pin_memory() for k, v in tensors.items()}
    return tensors | extra | {"sources": list(batch.header["sources"]),
                              "incarnation": batch.header.get("incarnation"),
                              "log_chain": batch.header.get("log_chain"),
                              "log_since": batch.header.get("log_since")}


def document_positions(boundaries: list[np.ndarray], length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``position_ids`` [rows, length], ``cu_seqlens`` [pieces + 1] (int32) and the longest piece.

    ``boundaries`` are each row's piece starts; pieces are cut to the first ``length`` tokens (the
    inputs, ``row[:-1]``), and positions restart at 0 at each piece start, as Megatron's
    ``reset_position_ids`` does.
    """
    positions = np.empty((len(boundaries), length), dtype=np.int64)
    lengths = []
    for r, starts in enumerate(boundaries):
        starts = starts[starts < length]
        ends = np.append(starts[1:], length)
        positions[r] = np.arange(length) - np.repeat(starts, ends - starts)
        lengths.append(ends - starts)
    flat = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    cu_seqlens = np.concatenate([[0], np.cumsum(flat)]).astype(np.int32)
    return torch.from_numpy(positions), torch.from_numpy(cu_seqlens), int(flat.max(initial=0))


def _shutdown(pool: ThreadPoolExecutor, owned: MixerClient | None) -> None:
    if owned is not None:
        owned.close()  # fails in-flight retries fast instead of waiting out their backoff
    pool.shutdown(wait=True, cancel_futures=True)
