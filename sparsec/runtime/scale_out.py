"""Calibration and per-layer solves scaled out on Ray (`--workers N`, `--ray ADDRESS`).

Calibration statistics are sums over samples: each worker (a Ray actor) opens its own onnxruntime
session on the instrumented graph, sums the batches it is sent, and the driver adds the shards in
float64. Independent per-layer solves run as tasks on the same workers (actor tasks: the workers hold
the CPUs), results in order. Ray is an optional dependency (`pip install 'sparsec[ray]'`); nothing here
is imported or started without these options.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from sparsec.errors import MissingDependencyError, SparsecError
from sparsec.runtime.instrument import StatSpec
from sparsec.runtime.session import run_checked, session_with_values
from sparsec.runtime.stat_sums import StatSums

INSTALL = "pip install 'sparsec[ray]'"
IN_FLIGHT = 2  # batches or solves queued per worker: enough to keep it busy, bounded memory
_started: dict[str, int] = {}  # the local instance this process started: {"cpus": N}
_pool: list = []  # calibration workers (actors) of the current Ray connection, reused across passes


@dataclass(frozen=True)
class ScaleOut:
    """Where the work goes: a local Ray instance with `workers` CPUs, or the cluster at `address`
    (`workers` then caps how many of its CPUs are used; None: all of them)."""

    workers: int | None = None
    address: str | None = None

    @property
    def flag(self) -> str:
        return f"--ray {self.address}" if self.address is not None else f"--workers {self.workers}"


def scale_out(workers: int | None, address: str | None) -> ScaleOut | None:
    """The scale-out the options ask for (None: one process), refusing early when Ray is missing."""
    if address is None and (workers is None or workers <= 1):
        return None
    scale = ScaleOut(workers, address)
    _ray(scale)
    return scale


def _ray(scale: ScaleOut):
    try:
        import ray
    except ImportError:
        raise MissingDependencyError(f"{scale.flag} needs Ray, which is not installed", INSTALL) from None
    return ray


def connect(scale: ScaleOut) -> tuple[Any, int]:
    """(ray, how many workers to use): starts the local instance or joins the cluster once per process."""
    ray = _ray(scale)
    if scale.address is None and ray.is_initialized() and _started.get("cpus") not in (None, scale.workers):
        ray.shutdown()  # this process started one of another size
        _started.clear()
    if not ray.is_initialized():
        _pool.clear()  # actors of an earlier connection are gone
        try:
            if scale.address is None:
                ray.init(num_cpus=scale.workers, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.ERROR)
                _started["cpus"] = scale.workers
            else:
                ray.init(address=scale.address, log_to_driver=False, logging_level=logging.ERROR)
        except Exception as exc:  # Ray raises ConnectionError, ValueError, RuntimeError...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SparsecError(f"{scale.flag}: Ray could not start: {first}",
                               "start a cluster with `ray start --head` or give its address") from None
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return ray, min(scale.workers or cpus, cpus)


def _get(ray, refs, scale: ScaleOut):
    """ray.get, with a worker's SparsecError re-raised as itself and a dead worker as one line."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, SparsecError):
            raise exc.cause from None
        raise
    except ray.exceptions.RayActorError as exc:
        first = str(exc).strip().splitlines()[0]
        raise SparsecError(f"{scale.flag}: a Ray worker died: {first}",
                           "give each worker more memory (docs/SCALE.md) or use fewer --workers") from None


class _Arrays:
    """A tensor store over arrays shipped through Ray's object store (read-only, shared per node)."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays

    def read(self, tensor: onnx.TensorProto) -> np.ndarray:
        return self.arrays[tensor.name]


class _Shard:
    """One worker, kept for the whole run (--sequential calibrates once per depth level): its own
    single-threaded onnxruntime session summing the batches it is sent, and the per-layer solves."""

    def load(self, graph: bytes, metas: list[tuple], arrays: dict[str, np.ndarray],
             spec_list: list[StatSpec], providers: list[str]) -> None:
        model = onnx.ModelProto.FromString(graph)
        tensors = [onnx.TensorProto(name=name, data_type=dtype, dims=dims) for name, dtype, dims in metas]
        self.session = session_with_values(model, tensors, _Arrays(arrays), providers, threads=1)
        self.names = [o.name for o in model.graph.output]
        self.sums = StatSums(spec_list)

    def add(self, samples: int, feeds: dict[str, np.ndarray]) -> int:
        outs = run_checked(self.session, self.names, feeds, "the calibration graph")
        self.sums.add(dict(zip(self.names, outs, strict=True)), samples)
        return samples

    def call(self, fn: Callable, *args, **kwargs):
        """A per-layer solve (or any independent job) on this worker."""
        return fn(*args, **kwargs)

    def result(self) -> StatSums:
        sums, self.session, self.sums = self.sums, None, None  # the weights' object can be freed
        return sums


def _shards(ray, n: int) -> list:
    """The first n workers of this Ray connection, started on first use and kept."""
    shard = ray.remote(num_cpus=1)(_Shard)
    while len(_pool) < n:
        _pool.append(shard.remote())
    return _pool[:n]


def sharded_sums(scale: ScaleOut, graph: onnx.ModelProto, tensors: list[onnx.TensorProto], store,
                 spec_list: list[StatSpec], batches: Iterable[tuple[int, dict[str, np.ndarray]]],
                 providers: list[str], done: Callable[[int], Any] = lambda n: None) -> StatSums:
    """The statistics of `batches` summed by workers (batch i goes to worker i mod N), then added
    in float64; `graph` has no initializers, `tensors` are its values, shipped once to the object store."""
    ray, n = connect(scale)
    arrays = ray.put({t.name: np.require(store.read(t), requirements="C") for t in tensors})
    metas = [(t.name, t.data_type, tuple(t.dims)) for t in tensors]
    shards, graph_bytes = _shards(ray, n), graph.SerializeToString()
    _get(ray, [s.load.remote(graph_bytes, metas, arrays, spec_list, providers) for s in shards], scale)
    del arrays  # the workers hold it now
    pending: list = []
    for i, (count, feeds) in enumerate(batches):
        pending.append(shards[i % n].add.remote(count, feeds))
        if len(pending) >= IN_FLIGHT * n:
            ready, pending = ray.wait(pending, num_returns=1)
            done(_get(ray, ready[0], scale))
    for ref in pending:
        done(_get(ray, ref, scale))
    total = StatSums(spec_list)
    for part in _get(ray, [s.result.remote() for s in shards], scale):
        total.merge(part)
    return total


def ordered_map(scale: ScaleOut | None, fn: Callable, jobs: Iterable[tuple[Any, tuple, dict]]
                ) -> Iterator[tuple[Any, Any]]:
    """(key, fn(*args, **kwargs)) for each (key, args, kwargs) job, in order: in this process without a
    scale-out, else on the workers (whichever has room, at most IN_FLIGHT queued each; jobs are read
    lazily, large arrays go to the object store by reference). The workers are the calibration actors:
    they hold the CPUs, so a separate Ray task would wait for them forever."""
    if scale is None:
        for key, args, kwargs in jobs:
            yield key, fn(*args, **kwargs)
        return
    ray, n = connect(scale)
    shards = _shards(ray, n)
    queue: deque = deque()  # (key, ref, worker) in job order
    load = [0] * n
    for key, args, kwargs in jobs:
        while min(load) >= IN_FLIGHT:  # every worker is full: hand back the oldest result first
            key0, ref, w = queue.popleft()
            load[w] -= 1
            yield key0, _get(ray, ref, scale)
        w = load.index(min(load))
        load[w] += 1
        queue.append((key, shards[w].call.remote(fn, *args, **kwargs), w))
    while queue:
        key0, ref, _ = queue.popleft()
        yield key0, _get(ray, ref, scale)
