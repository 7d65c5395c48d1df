"""Data parallelism under ``torchrun``: shard sample sets by index, gather in index order, write on rank 0.

Every long hasten command runs unchanged as ``torchrun --nproc-per-node N -m hasten <command> ...``. The
engine is PyTorch's own: ``torchrun`` starts the processes and the rendezvous (one node or many),
``torch.distributed`` moves the tensors (gloo between CPU processes, NCCL between GPUs). hasten adds only the
rules that make a run's results independent of the number of processes:

* **Work is split by sample index, in whole batches.** :func:`shard_batches` gives each rank a contiguous block
  of the run's batches (batch ``b`` holds samples ``[b * batch_size, (b + 1) * batch_size)`` whatever the number
  of processes), and :mod:`hasten.seeds` draws every sample's noise from its own index, so each sample is
  computed from the same noise, in the same batch, as in one process.
* **Results are gathered, not reduced.** :func:`gather_rows` returns all ranks' rows in index order on every
  rank, so every statistic downstream (FD, precision/recall, reference error) is computed from the same tensor
  in the same order as in one process: bit-identical on CPUs. A sum all-reduced over ranks would not be.
* **Rank 0 writes; every rank decides alike.** Files are written by the main rank only (:func:`is_main`);
  a decision taken from local state (a cache file present, a resume file) is taken on rank 0 and broadcast
  (:func:`broadcast_json`), so no rank enters a collective the others skip.
* **Every rank runs the same settings.** :func:`agree` hashes the settings on every rank and refuses a run whose
  ranks differ, naming the settings that differ.

A rank that fails ends the run: ``torchrun`` stops the other processes and prints the failed rank's error
(:func:`hasten.cli.app.main` records it). Nothing here is a scheduler: there is no retry, no queue.

Reference: PyTorch, "torchrun (Elastic Launch)" and "Distributed communication package - torch.distributed".
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import hashlib
import json
import os
import pathlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "MismatchError",
    "agree",
    "all_max",
    "all_sum",
    "average_gradients",
    "barrier",
    "broadcast_json",
    "clock",
    "destroy",
    "device_for",
    "even_batch_size",
    "from_main",
    "gather_features",
    "gather_json",
    "gather_rows",
    "init_from_env",
    "is_distributed",
    "is_main",
    "local",
    "main_has",
    "map_rows",
    "map_tasks",
    "rank",
    "reads_alone",
    "row_slice",
    "shard_batches",
    "shard_indices",
    "sharding",
    "world_size",
]

_LOCAL: contextvars.ContextVar[bool] = contextvars.ContextVar("hasten_distributed_local", default=False)
# A dtype travels as its index here (the gathered tensors' metadata is an int64 tensor, nothing is pickled).
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int64, torch.int32,
           torch.bool, torch.int8)  # fmt: skip
_MAX_DIMS = 8


class MismatchError(ValueError):
    """The ranks of a run do not run the same settings (the message names the ones that differ)."""


def _dist():
    import torch.distributed as dist

    return dist


def is_distributed() -> bool:
    """Whether a process group of more than one process is running."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return _dist().get_world_size() if is_distributed() else 1


def rank() -> int:
    return _dist().get_rank() if is_distributed() else 0


_world_size, _rank = world_size, rank  # for the functions whose arguments take these names


def is_main() -> bool:
    """Whether this process writes files and prints results (rank 0, or the only process)."""
    return rank() == 0


def sharding() -> bool:
    """Whether sample sets are split over ranks here (a process group, outside :func:`local`)."""
    return is_distributed() and not _LOCAL.get()


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Inside, this process works as if alone: it computes whole sample sets (a bench row it runs by itself) and
    every helper here skips its collective (gathers return this rank's own rows, :func:`main_has` looks at this
    rank's files). Files are still written by rank 0 only: send what another rank must write to rank 0."""
    token = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(token)


def init_from_env(timeout_minutes: float = 30.0) -> bool:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1); True if joined.

    CPU tensors travel over gloo and CUDA tensors over NCCL (one group serves both), so ``--device cpu`` and
    ``--device cuda`` work under the same launch. Each rank's GPU is ``cuda:LOCAL_RANK`` (:func:`device_for`).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dist = _dist()
    if dist.is_initialized():
        return True
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return True


def destroy(wait: bool = False) -> None:
    """Leave the process group (the end of a script; the CLI does it for its commands).

    ``wait``: meet the other ranks first (a normal end), so no rank tears its connections down while a peer
    still uses them. The group is destroyed and garbage collected while the interpreter is fully alive: gloo's
    threads must not release tensors during interpreter shutdown (seen here as rare SIGABRTs at exit,
    "terminate called without an active exception", after a run's files were complete).
    """
    import gc

    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        if wait and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
        gc.collect()


def device_for(device: str | torch.device) -> torch.device:
    """This rank's device for a requested one: ``cuda`` becomes ``cuda:LOCAL_RANK`` under ``torchrun``."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and is_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1))
    return device


def barrier() -> None:
    if sharding():
        _dist().barrier()


# -- sharding ---------------------------------------------------------------------------------------------


def shard_batches(n: int, batch_size: int, *, rank: int | None = None, world_size: int | None = None) -> list[range]:
    """This rank's batches of a set of ``n`` samples: a contiguous block of the global batches, as index ranges.

    Batch ``b`` is ``range(b * batch_size, min((b + 1) * batch_size, n))`` in every world size, so a sample is
    computed in the same batch as in one process. Blocks differ by at most one batch, larger blocks first; with
    fewer batches than ranks the last ranks get none (they still join the gathers). ``rank``/``world_size``
    default to this process's (all batches outside a sharded run).
    """
    if n < 0 or batch_size < 1:
        raise ValueError(f"need n >= 0 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    if world_size is None:
        world_size = _world_size() if sharding() else 1
    if rank is None:
        rank = _rank() if world_size > 1 else 0
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    count = -(-n // batch_size)
    # blocks differ by at most one batch, the larger ones first: rank 0 always holds the first samples
    base, extra = divmod(count, world_size)
    first = rank * base + min(rank, extra)
    last = first + base + (1 if rank < extra else 0)
    return [range(b * batch_size, min((b + 1) * batch_size, n)) for b in range(first, last)]


def even_batch_size(n: int, largest: int = 256) -> int:
    """The batch size that splits ``n`` samples into the fewest batches of at most ``largest``, as even as they come
    (the last short by less than one sample per batch): 1000 -> 250 x 4, not 256 x 3 + 232; 1001 -> 251 x 3 + 248.
    It depends on ``n`` alone, so it is the same on every process, and it balances a split by whole batches."""
    if n < 1 or largest < 1:
        raise ValueError(f"need n >= 1 and largest >= 1, got n={n}, largest={largest}")
    return -(-n // -(-n // largest))


def shard_indices(n: int, *, batch_size: int = 1, rank: int | None = None, world_size: int | None = None) -> range:
    """The sample indices this rank computes (the union of :func:`shard_batches`, contiguous)."""
    batches = shard_batches(n, batch_size, rank=rank, world_size=world_size)
    return range(batches[0].start, batches[-1].stop) if batches else range(0)


# -- collectives --------------------------------------------------------------------------------------------


def _comm_device(tensor: Tensor | None = None) -> torch.device:
    """Where a collective's tensors must live: CUDA for an NCCL-only group, else the tensor's own device."""
    dist = _dist()
    backend = str(dist.get_backend()).lower()
    if tensor is not None and tensor.device.type == "cuda" and "nccl" in backend:
        return tensor.device
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(tensor: Tensor) -> list[Tensor]:
    dist = _dist()
    device = _comm_device(tensor)
    sent = tensor.to(device)
    parts = [torch.empty_like(sent) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, sent)
    return parts


def gather_rows(local: Tensor | None) -> Tensor:
    """All ranks' rows, rank by rank (index order for :func:`shard_batches` shards), on every rank.

    ``local`` is this rank's ``[rows, ...]`` tensor; a rank with nothing to send passes None (the shape and dtype
    come from the others). Outside a sharded run it returns ``local`` itself. The result is on ``local``'s device
    (the CPU for a rank that sent None).
    """
    if not sharding():
        if local is None:
            raise ValueError("gather_rows(None) outside a sharded run: there are no rows")
        return local
    if local is not None and local.ndim > _MAX_DIMS:
        raise ValueError(f"gather_rows takes tensors of up to {_MAX_DIMS} dimensions, got {local.ndim}")
    meta = torch.full((3 + _MAX_DIMS,), -1, dtype=torch.int64)
    if local is not None:
        meta[0], meta[1], meta[2] = local.shape[0], local.ndim, _DTYPES.index(local.dtype)
        meta[3 : 3 + local.ndim] = torch.tensor(local.shape)
    metas = [m.cpu() for m in _all_gather(meta)]
    shapes = {(*m[4 : 3 + int(m[1])].tolist(), int(m[2])) for m in metas if int(m[0]) >= 0}
    if len(shapes) != 1:
        raise ValueError(f"ranks sent rows of different shapes or dtypes: {sorted(shapes)}")
    (spec,) = shapes
    trailing, dtype = spec[:-1], _DTYPES[spec[-1]]
    counts = [max(int(m[0]), 0) for m in metas]
    width = max(counts)
    home = local.device if local is not None else torch.device("cpu")
    padded = torch.zeros((width, *trailing), dtype=dtype, device=home)
    if local is not None and local.shape[0]:
        padded[: local.shape[0]] = local
    parts = _all_gather(padded)
    return torch.cat([part[:count].to(home) for part, count in zip(parts, counts, strict=True)])


def map_rows(fn: Callable[[Tensor], Any], rows: Tensor, chunk: int, *, outputs: int = 1) -> Any:
    """``fn`` applied to ``rows`` in chunks of ``chunk`` rows, the outputs concatenated in row order.

    In one process every chunk runs here; under ``torchrun`` each rank runs its block of the chunks
    (:func:`shard_batches`) and the outputs are gathered, so each row is computed in the same chunk either
    way (bit-identical on CPUs). ``fn`` returns a ``[len(chunk), ...]`` tensor, or a tuple of ``outputs`` of them.
    """
    results = [fn(rows[b.start : b.stop]) for b in shard_batches(len(rows), chunk)]
    if not results and not sharding():  # no rows: fn's own empty output (its shape and dtype)
        results = [fn(rows[:0])]
    if outputs == 1:
        return gather_rows(torch.cat(results) if results else None)
    columns = list(zip(*results, strict=True)) if results else [None] * outputs
    return tuple(gather_rows(None if col is None else torch.cat(col)) for col in columns)


def map_tasks(fn: Callable[[Any], Any], items: Sequence[Any], *, tensors: bool = False) -> list[Any]:
    """``[fn(item) for item in items]``, the items dealt round-robin over the ranks of a sharded run.

    Each rank runs its items alone (inside :func:`local`: an item's samples are not split again) and the results
    are gathered in item order on every rank. For work made of independent candidates (a tuner's population, a
    ladder of cache settings, bench rows, reflow's coupling chunks), where one item is too small to split by
    samples. ``fn`` returns a JSON-able value; with ``tensors=True`` a pair ``(value, {name: [rows, ...] tensor})``
    whose tensors are gathered too (rank 0 can then write them).
    """
    if not sharding():
        return [fn(item) for item in items]
    size, me = world_size(), rank()
    results: list[Any] = []
    for first in range(0, len(items), size):
        with local():
            mine = fn(items[first + me]) if first + me < len(items) else None
        done = len(items) - first  # ranks past the end (the last ones) had no item
        if not tensors:
            results += gather_json(mine)[:done]
            continue
        value, arrays = mine if mine is not None else (None, {})
        heads = gather_json(None if mine is None else [value, {name: len(t) for name, t in arrays.items()}])[:done]
        names = sorted({name for _, counts in heads for name in counts})
        gathered = {name: gather_rows(arrays.get(name)) for name in names}  # rank order = item order
        offsets = dict.fromkeys(names, 0)
        for value, counts in heads:
            part = {}
            for name, count in counts.items():
                part[name] = gathered[name][offsets[name] : offsets[name] + count]
                offsets[name] += count
            results.append((value, part))
    return results


def row_slice(n: int) -> slice:
    """This rank's rows of a global training batch of ``n`` (contiguous, sizes differing by at most one)."""
    if not sharding():
        return slice(0, n)
    size, me = world_size(), rank()
    return slice(me * n // size, (me + 1) * n // size)


def average_gradients(parameters: Sequence[torch.nn.Parameter], *, weight: float = 1.0) -> None:
    """Sum ``weight * grad`` over the ranks into every rank's ``grad`` (one flattened all-reduce, as DDP's
    buckets do). With each rank's ``weight`` its share of the global batch, this is the gradient of the
    global batch's mean loss. A parameter without a gradient counts as zero. A no-op outside a sharded run."""
    if not sharding():
        return
    params = list(parameters)
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]).mul_(weight)
    device = _comm_device(flat)
    reduced = flat.to(device)
    _dist().all_reduce(reduced)
    flat = reduced.to(flat.device)
    offset = 0
    for p in params:
        count = p.numel()
        p.grad = flat[offset : offset + count].view_as(p).clone()
        offset += count


def gather_features(local: Tensor | None) -> Tensor:
    """Feature rows of the samples each rank computed, gathered in sample-index order on every rank.

    FD and precision/recall are then computed from the same matrix as in one process (gathering, not summing,
    keeps them bit-identical). Feature rows are small beside images: ``4 * dim`` bytes a sample.
    """
    return gather_rows(local)


def _values(value: float) -> Tensor:
    return torch.cat([g.cpu() for g in _all_gather(torch.tensor([float(value)], dtype=torch.float64))])


def all_max(value: float) -> float:
    """The largest of the ranks' values (the NFE of a rank that had no batch is 0)."""
    return float(_values(value).max()) if sharding() else value


def all_sum(value: float) -> float:
    """The sum of the ranks' values (float64), e.g. of each process's loss weighted by its share of the batch."""
    return float(_values(value).sum()) if sharding() else value


def _gather_bytes(payload: bytes) -> list[bytes]:
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.zeros(0, dtype=torch.uint8)
    sizes = [int(s.cpu()) for s in _all_gather(torch.tensor([len(payload)], dtype=torch.int64))]
    padded = torch.zeros(max(sizes), dtype=torch.uint8)
    padded[: len(payload)] = data
    return [bytes(p.cpu()[:s].tolist()) for p, s in zip(_all_gather(padded), sizes, strict=True)]


def gather_json(value: Any) -> list[Any]:
    """Every rank's JSON-able ``value``, in rank order (``[value]`` outside a sharded run)."""
    if not sharding():
        return [value]
    return [json.loads(b) for b in _gather_bytes(json.dumps(value).encode())]  # key order kept: rows stay as written


def broadcast_json(value: Any) -> Any:
    """Rank 0's JSON-able ``value`` on every rank: a decision taken from rank 0's files, shared by all."""
    return gather_json(value)[0] if sharding() else value


def clock() -> float:
    """``time.perf_counter()``, rank 0's under a sharded run: durations and deadlines computed from it are the
    same on every rank, so a time budget ends at the same step everywhere (a rank that stopped alone would leave
    the others waiting in a collective)."""
    now = time.perf_counter()
    return float(broadcast_json(now)) if sharding() else now


def main_has(path: str | os.PathLike) -> bool:
    """Whether ``path`` exists on rank 0, on every rank: a cache hit decided once, so every rank takes the same
    branch (a rank computing what rank 0 loads would wait in a gather the others never join)."""
    if not sharding():
        return pathlib.Path(path).exists()
    return bool(broadcast_json(pathlib.Path(path).exists() if is_main() else False))


def reads_alone() -> bool:
    """Whether this process reads what :func:`main_has` found itself: rank 0, or any process outside a sharded
    run (inside :func:`local` too); the others get it through :func:`from_main`."""
    return is_main() or not sharding()


def from_main(tensor: Tensor | None) -> Tensor:
    """Rank 0's ``tensor`` on every rank (the others pass None): what rank 0 loaded from its cache."""
    if not sharding():
        if tensor is None:
            raise ValueError("from_main(None) outside a sharded run")
        return tensor
    dist = _dist()
    meta = torch.full((2 + _MAX_DIMS,), -1, dtype=torch.int64)
    if is_main():
        if tensor is None or tensor.ndim > _MAX_DIMS:
            raise ValueError(f"rank 0 must send a tensor of up to {_MAX_DIMS} dimensions")
        meta[0], meta[1] = tensor.ndim, _DTYPES.index(tensor.dtype)
        meta[2 : 2 + tensor.ndim] = torch.tensor(tensor.shape)
    device = _comm_device(tensor)
    meta = meta.to(device)
    dist.broadcast(meta, src=0)  # a broadcast: each rank receives the payload once (a gather would be W times)
    meta = meta.cpu()
    shape, dtype = tuple(meta[2 : 2 + int(meta[0])].tolist()), _DTYPES[int(meta[1])]
    home = tensor.device if tensor is not None else torch.device("cpu")
    payload = tensor.contiguous().to(device) if is_main() else torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(payload, src=0)
    return payload.to(home)


# -- agreement ------------------------------------------------------------------------------------------------


def agree(settings: dict[str, Any], what: str = "settings") -> None:
    """Refuse a run whose ranks do not share ``settings`` (JSON-able): every rank raises :class:`MismatchError`
    naming the keys that differ and which ranks hold which value. A no-op outside a sharded run."""
    if not sharding():
        return
    canonical = json.dumps(settings, sort_keys=True, default=str)
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    digests = gather_json(digest)
    if len(set(digests)) == 1:
        return
    everyone = [json.loads(s) for s in gather_json(canonical)]
    keys = sorted({k for s in everyone for k in s})
    differ = []
    for key in keys:
        values = [json.dumps(s.get(key, "<missing>"), sort_keys=True, default=str) for s in everyone]
        if len(set(values)) > 1:
            held = "; ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            differ.append(f"{key} ({held})")
    raise MismatchError(f"the ranks of this run do not share the same {what}: {', '.join(differ)}")
