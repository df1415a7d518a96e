"""Several processes, one training run: torch.distributed (launched by ``torchrun``) for anybit.

:func:`init_distributed` reads the environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ...), joins the process group (``nccl`` on CUDA, ``gloo`` on CPU, with a timeout, so
that a rank that stops answering makes the others fail instead of waiting forever) and returns a
:class:`DistContext`. Outside ``torchrun`` (or with one process) it returns a context of one rank whose
collectives do nothing, so the same code runs either way::

    ctx = anybit.train.distributed.init_distributed("auto")      # torchrun --nproc-per-node N script.py
    trainer = MultiBitTrainer(model, train, test, config, distributed=ctx, out_dir="runs/x")
    trainer.fit()
    ctx.close()

Objects (configurations, scores, per-rank accounting) travel over a CPU (gloo) group, so they need no
GPU; gradients go through :class:`torch.nn.parallel.DistributedDataParallel` on the main group.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

DEFAULT_TIMEOUT_S = 600.0   # how long a rank waits for the others at any collective before failing
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedError(ValueError):
    """Ranks disagree (configuration, data, weights), a rank failed, or the launch settings do not fit."""


def launched_by_torchrun() -> bool:
    """True when this process is one of several started by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    return all(k in os.environ for k in _ENV) and int(os.environ["WORLD_SIZE"]) > 1


@dataclass
class DistContext:
    """This process's place in the job (rank, world size, device) and the collectives anybit uses.

    With ``world_size == 1`` every collective returns its input: code written for several processes
    runs unchanged in one.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    group: Any = None          # the main group (DDP, device tensors)
    cpu_group: Any = None      # a gloo group for objects and CPU tensors (the main group itself with gloo)
    owns_group: bool = False   # init_distributed created the process group (close() destroys it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes outputs and prints."""
        return self.rank == 0

    def describe(self) -> dict:
        """For run.json."""
        return {"world_size": self.world_size, "backend": self.backend, "rank": self.rank,
                "local_world_size": self.local_world_size, "device": str(self.device),
                "timeout_s": self.timeout_s}

    # ------------------------------------------------------------------ objects (CPU group)
    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (pickled between the job's own processes)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        self._collective("gathering objects", dist.all_gather_object, out, obj, group=self.cpu_group)
        return out

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.rank == src else None]
        self._collective("broadcasting an object", dist.broadcast_object_list, box, src=src, group=self.cpu_group)
        return box[0]

    def barrier(self, what: str = "a barrier") -> None:
        """Wait for every rank; a rank that does not arrive within the timeout is named in the error."""
        if not self.enabled:
            return
        self._collective(what, dist.monitored_barrier, group=self.cpu_group,
                         timeout=timedelta(seconds=self.timeout_s), wait_all_ranks=True)

    # ------------------------------------------------------------------ tensors
    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place: the sum (``"sum"``), mean (``"mean"``), ``"max"`` or ``"min"`` over ranks."""
        if not self.enabled:
            return tensor
        ops = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
               "min": dist.ReduceOp.MIN}
        self._collective("reducing a tensor", dist.all_reduce, tensor, op=ops[op], group=self._group_for(tensor))
        if op == "mean":
            tensor.div_(self.world_size)
        return tensor

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """In place: rank ``src``'s values on every rank."""
        if self.enabled:
            self._collective("broadcasting a tensor", dist.broadcast, tensor, src=src, group=self._group_for(tensor))
        return tensor

    def gather_chunks(self, chunk: torch.Tensor) -> torch.Tensor:
        """The concatenation, in rank order, of every rank's 1-D ``chunk`` (lengths may differ by rank)."""
        if not self.enabled:
            return chunk
        chunk = chunk.detach().reshape(-1).cpu()
        lengths = self.all_gather_object(int(chunk.numel()))
        padded = torch.zeros(max(lengths), dtype=chunk.dtype)
        padded[: chunk.numel()] = chunk
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._collective("gathering a tensor", dist.all_gather, parts, padded, group=self.cpu_group)
        return torch.cat([p[:n] for p, n in zip(parts, lengths)])

    # ------------------------------------------------------------------ agreement
    def check_same(self, value: Any, what: str) -> None:
        """Raise :class:`DistributedError` on every rank unless every rank holds the same (JSON-able) ``value``."""
        if not self.enabled:
            return
        values = self.all_gather_object(value)
        differ = [r for r, v in enumerate(values) if _canonical(v) != _canonical(values[0])]
        if not differ:
            return
        detail = ""
        if isinstance(values[0], dict):
            from .config import config_differences

            first = differ[0]
            diff = config_differences(values[0], values[first])
            detail = ": " + "; ".join(f"{k}: rank 0 {a!r}, rank {first} {b!r}" for k, (a, b) in list(diff.items())[:8])
        raise DistributedError(f"the ranks disagree on {what} (rank(s) {differ} differ from rank 0){detail}. "
                               f"Every process of a job must be started with the same settings and data")

    @contextmanager
    def agreed(self, what: str) -> Iterator[None]:
        """Run the block on every rank, then make every rank fail if any rank failed in it (with that rank's
        message), so a mistake seen by one process (a missing dataset on one node, an existing output
        directory on rank 0) stops them all at once instead of leaving the others waiting."""
        error: BaseException | None = None
        try:
            yield
        except Exception as e:  # noqa: BLE001 - re-raised below, on this rank and the others
            error = e
        if not self.enabled:
            if error is not None:
                raise error
            return
        # a usage error (ValueError, FileNotFoundError) reads as the message alone, anything else with its type
        plain = isinstance(error, (ValueError, FileNotFoundError))
        reports = self.all_gather_object(None if error is None else str(error) if plain
                                         else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = [(r, m) for r, m in enumerate(reports) if m is not None]
        if failed:
            r, message = failed[0]
            raise DistributedError(f"rank {r} failed during {what}: {message}")

    # ------------------------------------------------------------------ shards and seeds
    def shard(self, n: int) -> torch.Tensor:
        """Indices ``rank, rank + world_size, ...`` of ``range(n)``: this rank's share of a dataset."""
        return torch.arange(self.rank, n, self.world_size)

    def close(self) -> None:
        """Leave the process group (if :func:`init_distributed` created it)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False

    # ------------------------------------------------------------------ internals
    def _group_for(self, tensor: torch.Tensor):
        return self.group if tensor.device.type != "cpu" or self.backend == "gloo" else self.cpu_group

    def _collective(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:   # a timeout or a rank that went away
            raise DistributedError(
                f"rank {self.rank}: {what} failed ({str(e).splitlines()[0][:300]}); another rank has failed, "
                f"stopped or not answered within {self.timeout_s:.0f} s (--dist-timeout)") from e


def init_distributed(device: str | torch.device = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Join the job ``torchrun`` started and return this process's :class:`DistContext`; without
    ``torchrun`` (or with one process), a context of one rank on ``device``.

    ``device``: ``auto`` (CUDA if available, else CPU), ``cpu`` or ``cuda``; with several processes each
    one takes ``cuda:LOCAL_RANK`` (so ``cuda:N`` is refused). Backend: ``nccl`` on CUDA, ``gloo`` on CPU;
    ``timeout_s`` bounds every wait for another rank.
    """
    if not timeout_s > 0:
        raise DistributedError(f"timeout_s={timeout_s!r} must be a positive number of seconds")
    requested = torch.device("cuda" if torch.cuda.is_available() else "cpu") if str(device) == "auto" \
        else torch.device(device)
    if not launched_by_torchrun():
        return DistContext(device=requested, timeout_s=float(timeout_s))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if requested.type == "cuda":
        if requested.index is not None and world > 1:
            raise DistributedError(f"device {requested} names one GPU, but under torchrun each of the {world} "
                                   f"processes takes cuda:LOCAL_RANK: give device 'cuda' (or 'auto')")
        if not torch.cuda.is_available():
            raise DistributedError("device 'cuda' was asked for but no CUDA GPU is available; use 'cpu'")
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                                   f"start at most that many processes per node (--nproc-per-node)")
        requested = torch.device("cuda", local_rank)
        torch.cuda.set_device(requested)
    elif requested.type != "cpu":
        raise DistributedError(f"device {requested} is not supported for distributed training: use cpu or cuda")
    backend = "nccl" if requested.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    owns = not dist.is_initialized()
    if owns:
        kwargs = {"device_id": requested} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timeout, **kwargs)
    elif dist.get_backend() != backend:
        raise DistributedError(f"the process group already uses {dist.get_backend()}, but device {requested} "
                               f"needs {backend}")
    cpu_group = dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                       device=requested, backend=backend, timeout_s=float(timeout_s), group=dist.group.WORLD,
                       cpu_group=cpu_group, owns_group=owns)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s own random streams (data augmentation): ``seed`` itself on rank 0, so a
    one-process run draws what rank 0 of a larger job draws; a hash of (seed, rank) elsewhere."""
    if rank == 0:
        return seed
    from .coreset import derive_seed

    return derive_seed(seed, "rank", rank)


def digest(tensors: dict[Any, torch.Tensor | None]) -> str:
    """A short hash of index lists (``None`` hashes as "all"), to compare plans across ranks and runs."""
    h = hashlib.blake2b(digest_size=8)
    for key in sorted(tensors, key=str):
        h.update(str(key).encode())
        value = tensors[key]
        h.update(b"all" if value is None else value.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def parameter_checksum(modules: list[nn.Module]) -> list[float]:
    """Per parameter, its sum and the sum of its absolute values (float64): equal on ranks holding equal
    weights, different (almost surely) where they drifted apart."""
    sums = []
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                d = p.detach().double()
                sums.append(torch.stack([d.sum(), d.abs().sum()]))
    if not sums:
        return []
    return torch.cat(sums).cpu().tolist()


def sync_buffers(ctx: DistContext, modules: list[nn.Module]) -> None:
    """Make every rank's buffers equal: BatchNorm running statistics (every per-precision set) are averaged
    over the ranks, every other buffer (counters, quantizer state) is rank 0's."""
    if not ctx.enabled:
        return
    averaged, copied = [], []
    for module in modules:
        for sub in module.modules():
            is_bn = isinstance(sub, nn.modules.batchnorm._BatchNorm)
            for name, buf in sub._buffers.items():
                if buf is None:
                    continue
                if is_bn and name.startswith("running_") and buf.is_floating_point():
                    averaged.append(buf)
                else:
                    copied.append(buf)
    _coalesced(ctx, averaged, "mean")
    _coalesced(ctx, copied, "broadcast")


def combine_bn_statistics(ctx: DistContext, modules: list[nn.Module]) -> None:
    """Every BatchNorm statistics set (plain, switchable members, per-precision) averaged over the ranks,
    each rank's weighted by the batches it counted (``num_batches_tracked``): after a cumulative pass
    over disjoint batches, the statistics one process computes over all of them."""
    if not ctx.enabled:
        return
    sets = []
    for module in modules:
        for m in module.modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            if hasattr(m, "trained_keys"):   # per-precision: one set per precision
                sets += [m._set(key) for key in m.trained_keys()]
            elif m.running_mean is not None:
                sets.append((m.running_mean, m.running_var, m.num_batches_tracked))
    if not sets:
        return
    counts = torch.stack([c.to(torch.float64) for _, _, c in sets])
    weighted = torch.cat([torch.cat([mean.double() * w, var.double() * w])
                          for (mean, var, _), w in zip(sets, counts)])
    ctx.all_reduce_(counts)
    ctx.all_reduce_(weighted)
    offset = 0
    for (mean, var, count), total in zip(sets, counts):
        n = mean.numel()
        if total > 0:
            mean.copy_(weighted[offset:offset + n] / total)
            var.copy_(weighted[offset + n:offset + 2 * n] / total)
            count.fill_(int(total))
        offset += 2 * n


def broadcast_buffers(ctx: DistContext, modules: list[nn.Module]) -> None:
    """Every buffer of ``modules`` as rank 0 holds it."""
    if ctx.enabled:
        _coalesced(ctx, [b for m in modules for b in m.buffers()], "broadcast")


def _coalesced(ctx: DistContext, tensors: list[torch.Tensor], op: str) -> None:
    """One collective per dtype and device over the flattened ``tensors``, results copied back in place."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for (dtype, _), members in groups.items():
        if dtype == torch.bool:
            flat = torch.cat([t.reshape(-1).to(torch.uint8) for t in members])
        else:
            flat = torch.cat([t.reshape(-1) for t in members])
        if op == "broadcast":
            ctx.broadcast_(flat, 0)
        else:
            ctx.all_reduce_(flat, op)
        offset = 0
        for t in members:
            n = t.numel()
            t.copy_(flat[offset:offset + n].reshape(t.shape).to(t.dtype))
            offset += n


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


__all__ = ["DEFAULT_TIMEOUT_S", "DistContext", "DistributedError", "broadcast_buffers", "combine_bn_statistics", "digest",
           "init_distributed", "launched_by_torchrun", "parameter_checksum", "rank_seed", "sync_buffers"]
