"""Data-parallel training over several processes, GPUs and machines (torchrun): setup, collectives, DataLoader.

Training (``torchrun --nproc_per_node N -m dreamcache.train ...``): torchrun starts one process per rank and tells
it ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous (``MASTER_ADDR``/``MASTER_PORT``). Each rank owns one
device (CUDA GPU ``LOCAL_RANK`` with NCCL, or the CPU with Gloo when ``--device cpu`` is given to every rank), runs
its own ComfyUI model management on that device and trains the same adapters on its own share of every global batch.

* **Data.** The global batch of a step is ``world_size x batch_size x accumulate`` consecutive sample positions of
  the position-seeded order (:class:`dreamcache.apps.data.TrainingData`): step ``s`` covers ``s*G .. s*G+G-1``;
  micro-batch ``k`` of rank ``r`` (counted from the start of the stream) takes
  ``start + k*N*B + r*B .. + B - 1``. With one rank that is exactly the single-process order, and the set of
  samples of a step does not depend on how it is split, so a run is reproducible for a given world size and a
  state saved with N ranks resumes with M ranks at the same global step and data position.
* **Gradients.** After a step's micro-batches every rank puts its adapter gradients, its loss and a small status
  block (failure flag, compute seconds, peak GPU memory, which parameters have gradients) into **one** fp32 buffer
  and all-reduces it (sum), then divides by N. Why not DistributedDataParallel: the adapters are not called as a
  module; they run inside ComfyUI's U-Net through the DreamCache patch (several layers, trainable mode), so DDP's
  forward wrapper would not see the forward pass, and with gradient accumulation it would need ``no_sync`` on every
  micro-batch but the last anyway. One fused all-reduce per optimizer step is what DDP would do at the end of the
  last backward (25 M parameters, ~100 MB: milliseconds on NVLink, well under 1% of a ~0.3 s step), keeps the
  single-process path untouched, and lets a rank that failed (out of memory, a broken file) say so in the same
  collective: every rank then stops with a message naming the failed rank instead of waiting for it.
* **Files.** Rank 0 alone writes checkpoints, the loss CSV and previews and shows the progress bar; the logged loss
  is the global mean.
* **Failures.** A rank that dies makes the others' collective fail (Gloo: at once; NCCL: after ``--dist-timeout``,
  by PyTorch's watchdog) and torchrun stops the remaining ranks; the timeout bounds how long a rank waits for a
  hung one. Misconfigurations (no GPU for a rank, NCCL missing, a global batch that does not split, ranks that see
  different datasets or settings) are one-sentence errors naming the rank.

Synthesis shards over the same launcher (:mod:`dreamcache.apps.data.sharding`); the batch arithmetic is in
:mod:`dreamcache.apps.train.batch`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from datetime import timedelta

import torch

from ...core.errors import DreamCacheError
from ..launcher import launch_from_env
from .config import DEFAULT_TIMEOUT_S

log = logging.getLogger(__name__)


#: status codes a rank puts in the step's all-reduce
OK, FAILED_OOM, FAILED_ERROR = 0, 1, 2


class DistributedStop(DreamCacheError):
    """Another rank failed (or the ranks disagree); raised on every rank at the same point."""


# ---------------------------------------------------------------------------------------------------------------------
# The per-process context


class DistContext:
    """This process's place in the run. ``world_size == 1`` (:meth:`single`) is the plain single-process trainer:
    every hook is then the identity, no collective runs and nothing changes in the results."""

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        local_rank: int = 0,
        device: torch.device | None = None,
        backend: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        owns_group: bool = False,
    ):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = device
        self.backend = backend
        self.timeout_s = timeout_s
        self.owns_group = owns_group
        self.host = socket.gethostname()
        self._t_step = None
        self._params = None  # the trainer's parameters (the layout of the step all-reduce)
        self._last = None
        self._collective_failed = False
        self._closed = False
        self.steps: list[dict] = []  # per-step throughput records of this process's run() calls

    @classmethod
    def single(cls) -> "DistContext":
        return cls()

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def where(self) -> str:
        return f"rank {self.rank} of {self.world_size} (local rank {self.local_rank} on {self.host})"

    def prefix(self) -> str:
        """What an error line starts with: the rank in a distributed run, nothing otherwise."""
        return f"{self.where()}: " if self.enabled else ""

    def close(self, finished: bool = True):
        """End of a run. ``finished``: wait for every rank (bounded by the timeout), then leave the process group
        we created. After a failure nothing waits (the other ranks may be in another collective, or gone): the
        process is about to exit and the group goes with it. Idempotent."""
        import torch.distributed as dist

        if not self.enabled or self._closed or not dist.is_initialized():
            return
        self._closed = True
        if not finished or self._collective_failed:
            return
        try:
            kw = {"device_ids": [self.local_rank]} if self.backend == "nccl" else {}
            self._collective(dist.barrier, "the final barrier", **kw)
        except DreamCacheError as e:
            log.warning("%s", e)
            return
        if self.owns_group:
            dist.destroy_process_group()

    # ---- data ---------------------------------------------------------------------------------------------------
    def batches(self, data, batch_size: int, start_position: int, num_workers: int = 0):
        """This rank's micro-batches (endless), see the module docstring for the positions."""
        from ..data import collate

        sampler = RankPositionSampler(start_position, self.rank, self.world_size, batch_size)
        loader = torch.utils.data.DataLoader(
            data,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            prefetch_factor=2 if num_workers > 0 else None,
        )
        return iter(loader)

    # ---- collectives ----------------------------------------------------------------------------------------------
    def _collective(self, fn, what: str, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # Gloo/NCCL errors are RuntimeError subclasses (DistBackendError, DistNetworkError, ...)
            if isinstance(e, DreamCacheError):
                raise
            self._collective_failed = True
            text = " ".join(str(e).split())[:200]
            raise DistributedStop(
                f"lost contact with the other ranks in {what} ({type(e).__name__}: {text}); another rank died, or "
                f"hung for longer than --dist-timeout {self.timeout_s:g} s; see the other ranks' messages, and raise "
                "--dist-timeout "
                "if rank 0's previews or checkpoints are slow."
            ) from None

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def start(self, trainer):
        """Before the first step: every rank must train the same adapters with the same settings on the same data,
        from the same step; otherwise all ranks stop with an error naming the ranks that differ."""
        if self.device is None:
            self.device = trainer.device  # (single process: only for the peak-memory column)
        self._params = list(trainer.params)
        if not self.enabled:
            return
        import torch.distributed as dist

        cfg = trainer.cfg
        keys = [k for k in cfg.IDENTITY if k not in ("data", "init_from")] + ["steps"]
        config_digest = _digest(json.dumps({k: getattr(cfg, k) for k in keys}, sort_keys=True, default=str).encode())
        names = "\n".join(it.name for it in trainer.data.index.items).encode()
        data_digest = _digest(names)
        h = hashlib.sha1()
        for p in trainer.params:
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        weights_digest = _digest(h.digest())
        mine = torch.tensor(
            [config_digest, data_digest, weights_digest, trainer.step, len(trainer.data.index)],
            dtype=torch.int64,
            device=self._comm_device(),
        )
        got = [torch.zeros_like(mine) for _ in range(self.world_size)]
        self._collective(dist.all_gather, "the start-up check", got, mine)
        rows = [g.tolist() for g in got]
        what = (
            "settings (batch, lr, seed, layers, steps, ...)",
            "dataset (item list)",
            "adapter weights (--init-from / --resume file)",
            "training step",
        )
        for i, label in enumerate(what):
            bad = [r for r in range(self.world_size) if rows[r][i] != rows[0][i]]
            if bad:
                extra = f" ({rows[bad[0]][4]} items on rank {bad[0]}, {rows[0][4]} on rank 0)" if i == 1 else ""
                extra = f" (step {rows[bad[0]][3]} on rank {bad[0]}, {rows[0][3]} on rank 0)" if i == 3 else extra
                raise DistributedStop(
                    f"rank(s) {', '.join(map(str, bad))} differ from rank 0 in their {label}{extra}; every "
                    "rank must get the same command line and see the same files (on every machine)."
                )

    @contextmanager
    def step_guard(self, step: int):
        """Around one optimizer step. A rank whose step fails tells the others in the step's all-reduce (so they
        stop instead of waiting for it); then its own error propagates."""
        self._t_step = time.perf_counter()
        try:
            yield
        except DistributedStop:
            raise
        except Exception as e:
            if self.enabled and not self._collective_failed and self._params is not None:
                code = (
                    FAILED_OOM
                    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
                    else FAILED_ERROR
                )
                try:
                    self._failure_reduce(code)
                except DreamCacheError:
                    pass
            raise

    def peak_mib(self) -> float | None:
        dev = self.device
        if dev is None or dev.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(dev) / 2**20

    def _layout(self, params) -> tuple[int, int]:
        total = sum(p.numel() for p in params)
        return total, total + 1 + 3 * self.world_size + len(params)

    def _failure_reduce(self, code: int):
        import torch.distributed as dist

        params = self._params
        total, size = self._layout(params)
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.empty_cache()
        buf = torch.zeros(size, dtype=torch.float32, device=self._comm_device())
        buf[total + 1 + self.rank] = code
        self._collective(dist.all_reduce, "the step all-reduce", buf)

    def reduce_step(self, params, loss: float, step: int, images: int) -> float:
        """The step's all-reduce: gradients averaged over the ranks (in place), the global mean loss returned; a
        failure on any rank stops every rank here. ``images``: this rank's images of the step."""
        compute = time.perf_counter() - (self._t_step or time.perf_counter())
        peak = self.peak_mib()
        if not self.enabled:
            self._last = {"compute": [compute], "peak": [peak], "images": images}
            return loss
        import torch.distributed as dist

        n = self.world_size
        total, size = self._layout(params)
        dev = self._comm_device()
        buf = torch.zeros(size, dtype=torch.float32, device=dev)
        tail = torch.zeros(size - total, dtype=torch.float32)  # loss, status, compute s, peak MiB, has-grad flags
        off = 0
        for i, p in enumerate(params):
            if p.grad is not None:
                buf[off : off + p.numel()].copy_(p.grad.reshape(-1))
                tail[1 + 3 * n + i] = 1.0
            off += p.numel()
        tail[0] = loss
        tail[1 + n + self.rank] = compute
        tail[1 + 2 * n + self.rank] = -1.0 if peak is None else peak
        buf[total:].copy_(tail)  # one host-to-device copy
        self._collective(dist.all_reduce, f"the all-reduce of step {step}", buf)
        tail = buf[total:].cpu()
        status = tail[1 : 1 + n].tolist()
        failed = [(r, int(c)) for r, c in enumerate(status) if c != OK]
        if failed:
            oom = [r for r, c in failed if c == FAILED_OOM]
            other = [r for r, c in failed if c != FAILED_OOM]
            parts = ([f"rank {', '.join(map(str, oom))} ran out of GPU memory"] if oom else []) + (
                [f"rank {', '.join(map(str, other))} failed"] if other else []
            )
            raise DistributedStop(
                f"{' and '.join(parts)} at step {step} (see that rank's message); every rank stops here."
            )
        buf[:total].div_(n)
        has = tail[1 + 3 * n :].tolist()
        off = 0
        for i, p in enumerate(params):
            k = p.numel()
            if has[i] > 0:
                g = buf[off : off + k].view_as(p).to(p.device)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
            off += k
        peaks = tail[1 + 2 * n : 1 + 3 * n].tolist()
        self._last = {
            "compute": tail[1 + n : 1 + 2 * n].tolist(),
            "peak": [None if x < 0 else x for x in peaks],
            "images": images,
        }
        return float(tail[0]) / n

    # ---- throughput -------------------------------------------------------------------------------------------------
    def log_fields(self, fields: list[str]) -> list[str]:
        extra = ["peak_gpu_mib"]
        if self.enabled:
            for r in range(self.world_size):
                extra += [f"rank{r}_images_per_second", f"rank{r}_peak_gpu_mib"]
        return list(fields) + extra

    def step_record(self, seconds: float) -> dict:
        """The CSV columns of the step just done (peak GPU memory so far, per-rank images/s of compute time)."""
        last = self._last or {"compute": [seconds], "peak": [self.peak_mib()], "images": 0}
        rec = {"seconds": seconds, **last}
        self.steps.append(rec)
        peaks = [p for p in last["peak"] if p is not None]
        row = {"peak_gpu_mib": f"{max(peaks):.0f}" if peaks else ""}
        if self.enabled:
            for r in range(self.world_size):
                c, p = last["compute"][r], last["peak"][r]
                row[f"rank{r}_images_per_second"] = f"{last['images'] / c:.3f}" if c > 0 else ""
                row[f"rank{r}_peak_gpu_mib"] = "" if p is None else f"{p:.0f}"
        return row

    def summary(self, global_batch: int) -> str:
        """One line for the end of a run: images/s over all ranks and per rank, peak GPU memory per rank."""
        recs = self.steps[1:] if len(self.steps) > 1 else self.steps  # the first step warms up (allocations, kernels)
        if not recs:
            return "throughput: no steps run"
        seconds = sum(r["seconds"] for r in recs)
        ips = global_batch * len(recs) / seconds if seconds > 0 else float("nan")
        first = " (first step not counted)" if len(self.steps) > 1 else ""
        steps = f"{len(recs)} step{'s' if len(recs) != 1 else ''}{first}"
        per_rank = ips / self.world_size
        text = f"throughput: {ips:.2f} images/s over {self.world_size} rank(s), {per_rank:.2f} per rank, {steps}"
        peaks = [
            max((r["peak"][i] or 0.0) for r in self.steps)
            if any(r["peak"][i] is not None for r in self.steps)
            else None
            for i in range(len(self.steps[-1]["peak"]))
        ]
        if all(p is None for p in peaks):
            return text + "; peak GPU memory: none (CPU)"
        return (
            text
            + "; peak GPU memory per rank: "
            + ", ".join(f"rank {i} {p / 1024:.2f} GiB" if p is not None else f"rank {i} -" for i, p in enumerate(peaks))
        )


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.sha1(data).digest()[:8], "little", signed=True)


class RankPositionSampler(torch.utils.data.Sampler):
    """Positions of rank ``rank``'s micro-batches: batch ``k`` is ``start + k*world*batch + rank*batch + j``."""

    def __init__(self, start: int, rank: int, world_size: int, batch_size: int):
        self.start, self.rank, self.world, self.batch = int(start), int(rank), int(world_size), int(batch_size)

    def __iter__(self):
        k = 0
        while True:
            base = self.start + k * self.world * self.batch + self.rank * self.batch
            yield from range(base, base + self.batch)
            k += 1


# ---------------------------------------------------------------------------------------------------------------------
# Setting up a rank


def setup(device: str = "auto", backend: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """This process's :class:`DistContext`: single-process unless a launcher set ``WORLD_SIZE`` > 1; then the
    rank's device is chosen (and made CUDA's current device before ComfyUI is imported, so its model management
    works on it) and the process group joined."""
    launch = launch_from_env()
    if launch is None or launch.world_size == 1:
        return DistContext.single()
    import torch.distributed as dist

    rank, world, local = launch.rank, launch.world_size, launch.local_rank
    host = socket.gethostname()
    where = f"rank {rank} of {world} (local rank {local} on {host})"
    if not timeout_s > 0:
        raise DreamCacheError(f"{where}: --dist-timeout {timeout_s} must be positive.")
    if not dist.is_available():
        raise DreamCacheError(
            f"{where}: this PyTorch build has no torch.distributed; install an official PyTorch build."
        )
    if device == "cpu":
        dev = torch.device("cpu")
        chosen = "gloo" if backend == "auto" else backend
        if chosen == "nccl":
            raise DreamCacheError(
                f"{where}: NCCL needs CUDA GPUs but --device cpu was given; "
                "use --dist-backend gloo (or auto) on the CPU."
            )
    else:
        if not torch.cuda.is_available():
            raise DreamCacheError(
                f"{where} has no GPU: PyTorch on {host} sees no CUDA device; fix the driver/CUDA install on that "
                "machine, or pass --device cpu to every rank to train on CPUs with Gloo (slow)."
            )
        count = torch.cuda.device_count()
        if local >= count:
            raise DreamCacheError(
                f"{where} has no GPU: {host} has {count} CUDA GPU(s) (cuda:0..{count - 1}) "
                f"but this is local rank {local}; "
                f"start at most {count} processes on that machine (torchrun --nproc_per_node {count})."
            )
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        chosen = "nccl" if backend == "auto" else backend
    if chosen == "nccl" and not dist.is_nccl_available():
        raise DreamCacheError(
            f"{where}: this PyTorch build has no NCCL, which multi-GPU training uses; install a CUDA build of PyTorch "
            "on Linux, or pass --dist-backend gloo to every rank (slower)."
        )
    if chosen == "gloo" and not dist.is_gloo_available():
        raise DreamCacheError(
            f"{where}: this PyTorch build has no Gloo backend; install an official PyTorch build "
            "or use --dist-backend nccl on GPUs."
        )
    owns = False
    if dist.is_initialized():
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise DreamCacheError(
                f"{where}: a process group of another shape ({dist.get_rank()} of {dist.get_world_size()}) "
                "is already set up."
            )
        chosen = dist.get_backend()
    else:
        try:
            dist.init_process_group(chosen, timeout=timedelta(seconds=timeout_s))
        except Exception as e:
            addr = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise DreamCacheError(
                f"{where} could not join the other ranks at {addr} within --dist-timeout {timeout_s:g} s "
                f"({type(e).__name__}: {' '.join(str(e).split())[:160]}); check torchrun's --rdzv-endpoint / "
                "--master-addr and that every machine can reach it."
            ) from None
        owns = True
    return DistContext(rank, world, local, dev, chosen, timeout_s, owns)
