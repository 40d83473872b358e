"""Data-parallel training across processes with PyTorch's own engine: torchrun + DistributedDataParallel.

``densenet train`` becomes distributed when it runs under ``torchrun`` (or any launcher that sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``): :func:`setup`
joins the process group (``nccl`` on CUDA devices, ``gloo`` on the CPU) with a timeout, so that a
process that dies or hangs makes the others fail within bounded time instead of waiting forever.
The trainer (``densenet.trainer``) then

- wraps the model in ``DistributedDataParallel`` (gradients averaged across processes),
- gives each process its disjoint share of every epoch (``epoch_batches(rank=, world_size=)``),
- reduces the epoch's sums (loss, correct, images; the slowest process's seconds) across processes,
- evaluates each process's share of the test set and adds up the counts (:func:`reduce_evaluation`),
  so the accuracy is over every test image exactly once,
- lets only rank 0 print and write files, and agrees on stopping (signals, time budget, a loss that
  is not finite) so that every process stops after the same step.

``densenet train --nproc N`` is a shortcut for ``python -m torch.distributed.run --standalone
--nproc_per_node N -m densenet train ...`` (:func:`launch`).

Test hook: with ``DENSENET_DIST_DEBUG=DIR`` every process appends JSON lines to
``DIR/rank<R>.jsonl``: its pid, the training-set indices of every epoch it trained on, and the
SHA-256 of its final weights (:func:`debug_log`).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from densenet.errors import ConfigError, DenseNetError
from densenet.runtime import resolve_device

DEFAULT_TIMEOUT = 300.0  # seconds a collective may wait for the other processes
DEBUG_ENV = "DENSENET_DIST_DEBUG"
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")

# codes for agreeing on why to stop; the largest wins
STOP_CODES = {"": 0, "time budget": 1, "SIGTERM": 2, "SIGINT": 3}


class DistributedError(DenseNetError):
    """The processes of a distributed run lost each other: one died, hung or cannot be reached."""


@dataclass
class Context:
    """Where this process stands in the run: rank, world size, device and backend.

    A single-process run has ``world_size`` 1 and no process group; every method then does the
    local thing, so the trainer calls them unconditionally.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # None: no process group
    timeout: float = DEFAULT_TIMEOUT

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size}"

    # collectives -------------------------------------------------------------------------------

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every process (pickled; only for small things like paths)."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj) -> list:
        """Every process's ``obj``, in rank order, on every process."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def sum(self, values: list[float], dtype=torch.float64) -> list:
        """Element-wise sums over the processes."""
        return self._reduce(values, dtype, "sum")

    def max(self, values: list[float], dtype=torch.float64) -> list:
        return self._reduce(values, dtype, "max")

    def _reduce(self, values, dtype, op: str) -> list:
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=dtype, device=self.device)
        ops = torch.distributed.ReduceOp
        torch.distributed.all_reduce(t, op=ops.SUM if op == "sum" else ops.MAX)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on at least one."""
        return bool(self.max([float(flag)])[0]) if self.distributed else bool(flag)

    def agree_stop(self, reason: str) -> str:
        """The stop reason all processes adopt: the strongest one any of them has ("" to go on)."""
        if not self.distributed:
            return reason
        code = int(self.max([float(STOP_CODES[reason])])[0])
        return {v: k for k, v in STOP_CODES.items()}[code]

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) into every process's ``module``.

        DDP broadcasts them before each training forward, but each process's last forward then
        updates its own copy; evaluating and saving use rank 0's, as a single process would.
        """
        if not self.distributed:
            return
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer.data, src=0)


def env_ranks(environ=None) -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from a launcher's environment, or None outside one."""
    environ = os.environ if environ is None else environ
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return None
    try:
        rank = int(environ["RANK"])
        world = int(environ["WORLD_SIZE"])
        local = int(environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise ConfigError(
            f"RANK/WORLD_SIZE/LOCAL_RANK must be integers, got {[environ.get(k) for k in ENV_VARS]}"
        ) from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(
            f"inconsistent launcher environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}"
        )
    return rank, world, local


def setup(device_name: str | None, timeout: float = DEFAULT_TIMEOUT) -> Context:
    """Join the process group when launched by torchrun; else a single-process :class:`Context`.

    ``device_name`` is the ``--device`` value: under a launcher ``auto`` and ``cuda`` mean
    ``cuda:LOCAL_RANK`` (backend nccl), ``cpu`` or ``auto`` without CUDA the CPU (backend gloo).
    """
    ranks = env_ranks()
    if ranks is None:
        return Context(device=resolve_device(device_name))
    rank, world, local = ranks
    if not timeout or timeout <= 0:
        raise ConfigError(f"--dist-timeout must be positive seconds, got {timeout}")
    name = (device_name or "auto").strip().lower()
    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"under torchrun --device must be auto, cpu or cuda (each process takes "
                          f"cuda:LOCAL_RANK), got {device_name!r}")
    use_cuda = name == "cuda" or (name == "auto" and torch.cuda.is_available())
    if use_cuda:
        resolve_device("cuda")  # a one-line error when there is no CUDA
        count = torch.cuda.device_count()
        if local >= count:
            raise ConfigError(f"LOCAL_RANK {local} but this node has {count} CUDA device(s): start at most "
                              f"{count} processes per node (--nproc_per_node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(
            f"RANK and WORLD_SIZE are set but {', '.join(missing)} is not: launch with torchrun"
        )
    try:
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world,
                                             timeout=timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as exc:
        address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        raise DistributedError(
            f"rank {rank} of {world} could not join the process group at {address}: {first_line(exc)}"
        ) from None
    return Context(rank=rank, world_size=world, local_rank=local, device=device, backend=backend,
                   timeout=timeout)


def teardown(context: Context) -> None:
    """Leave the process group (also after a failure: it does not wait for the others).

    Drop every reference to the ``DistributedDataParallel`` model first: collecting it here, while
    the group is still registered, means the group itself is destroyed by this call (which
    releases the GIL while gloo's worker threads finish) rather than later from DDP's destructor.
    """
    if context.distributed and torch.distributed.is_initialized():
        gc.collect()
        torch.distributed.destroy_process_group()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a collective whose peers died, hung or closed the connection."""
    if isinstance(exc, torch.distributed.DistError):
        return True
    text = str(exc)
    markers = ("gloo", "NCCL", "ProcessGroup", "Timed out")
    return isinstance(exc, RuntimeError) and any(k in text for k in markers)


def peer_failure(context: Context, exc: BaseException, kept: str = "") -> DistributedError:
    """A one-line :class:`DistributedError` for a failed collective; ``kept`` says what can be resumed."""
    kept = f"; {kept}" if kept else ""
    # gloo's messages start with a source location and end with advice; keep the middle
    cause = re.sub(r"^\[[^\]]*\]\s*", "", first_line(exc)).split(". This is typically")[0]
    return DistributedError(
        f"{context.describe()} lost the other processes ({cause}): one of them failed, was "
        f"killed or did not answer within --dist-timeout {context.timeout:g} s{kept}"
    )


# --- shards and reductions --------------------------------------------------------------------


def shard_indices(num_samples: int, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s share of ``num_samples`` items: every world_size-th from ``rank``.

    The shares are disjoint and together hold every item exactly once (they differ in size by at
    most one: the remainder is neither padded nor dropped).
    """
    return torch.arange(num_samples)[rank::world_size]


def shard_dataset(dataset, rank: int, world_size: int):
    """The :func:`shard_indices` share of a :class:`densenet.data.Dataset`."""
    import dataclasses

    if world_size == 1:
        return dataset
    idx = shard_indices(len(dataset), rank, world_size).to(dataset.images.device)
    return dataclasses.replace(dataset, images=dataset.images[idx], labels=dataset.labels[idx])


def reduce_evaluation(context: Context, result: dict | None, classes: list[str], tta: bool = False,
                      tta_translate: bool = False) -> dict:
    """Combine each process's :func:`densenet.inference.evaluate` result of its own share.

    ``result`` is None for a process whose share is empty. Counts (images, top-1 via the
    confusion matrix, top-5) and the loss sum are added up across processes, so the returned dict
    (same keys as ``evaluate``'s) describes the whole set.
    """
    k = len(classes)
    if result is None:
        n, loss_sum, top5, confusion = 0, 0.0, 0, [0] * (k * k)
    else:
        n = int(result["num_samples"])
        loss_sum = float(result["loss"]) * n
        top5 = round(float(result["top5"]) * n)
        confusion = [v for row in result["confusion"] for v in row]
    (loss_sum,) = context.sum([loss_sum])
    counts = context.sum([n, top5, *confusion], dtype=torch.int64)
    n, top5, confusion = int(counts[0]), int(counts[1]), counts[2:]
    matrix = torch.tensor(confusion, dtype=torch.long).view(k, k)
    totals = matrix.sum(dim=1).tolist()
    correct = matrix.diagonal().tolist()
    return {
        "num_samples": n,
        "loss": loss_sum / n,
        "top1": sum(correct) / n,
        "top5": top5 / n,
        "tta": bool(tta),
        "tta_translate": bool(tta_translate),
        "classes": list(classes),
        "per_class": [
            {"class": c, "total": t, "correct": r, "accuracy": (r / t if t else None)}
            for c, t, r in zip(classes, totals, correct)
        ],
        "confusion": matrix.tolist(),
    }


def reduce_partial(context: Context, partial: dict) -> dict:
    """An epoch's running sums over all processes: loss sum, correct and images added, the longest seconds."""
    if not context.distributed:
        return dict(partial)
    loss_sum, correct, seen = context.sum([partial["loss_sum"], partial["correct"], partial["seen"]])
    (seconds,) = context.max([partial["seconds"]])
    return {"loss_sum": loss_sum, "correct": int(correct), "seen": int(seen), "seconds": seconds}


def rank_seed(seed: int, rank: int) -> int:
    """A seed for rank ``rank``'s global RNG (dropout) distinct from the other ranks'."""
    return int(np.random.SeedSequence([seed, rank, 0xD15]).generate_state(1, np.uint64)[0] >> 1)


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict (names, dtypes, shapes and contiguous bytes, in name order)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def debug_enabled() -> bool:
    return bool(os.environ.get(DEBUG_ENV))


def debug_log(context: Context, event: str, **data) -> None:
    """Append one JSON line to ``$DENSENET_DIST_DEBUG/rank<R>.jsonl`` (nothing when it is unset)."""
    directory = os.environ.get(DEBUG_ENV)
    if not directory:
        return
    path = Path(directory) / f"rank{context.rank}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"event": event, "rank": context.rank, "world_size": context.world_size, "pid": os.getpid(),
              **data}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


# --- the --nproc shortcut ---------------------------------------------------------------------


def argv_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, skip=()) -> list[str]:
    """The command-line arguments that give ``args`` again when parsed by ``parser``.

    Options left at None (argparse's "not given") are omitted; ``skip`` names destinations to
    leave out (e.g. ``nproc``).
    """
    argv: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in skip or isinstance(action, argparse._HelpAction):
            continue
        value = getattr(args, action.dest, None)
        if value is None or value == action.default:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            positive = [s for s in action.option_strings if not s.startswith("--no-")][0]
            negative = [s for s in action.option_strings if s.startswith("--no-")][0]
            argv.append(positive if value else negative)
        elif isinstance(action, argparse._StoreConstAction):  # also store_true / store_false
            if value == action.const:
                argv.append(action.option_strings[0])
        else:
            text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
            argv += [action.option_strings[0], text]
    return argv


def launch_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command that starts ``densenet train <argv>`` in ``nproc`` processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "densenet", "train", *argv]


def launch(nproc: int, argv: list[str]) -> int:
    """Run :func:`launch_command` and return its exit status.

    Ctrl-C reaches torchrun (and its workers) from the terminal directly, so this process ignores
    SIGINT while waiting; a SIGTERM sent to it is passed on to torchrun, which passes it to the
    workers (they save a checkpoint and stop).
    """
    if nproc < 1:
        raise ConfigError(f"--nproc must be a positive number of processes, got {nproc}")
    if env_ranks() is not None:
        raise ConfigError("--nproc starts torchrun itself; under torchrun (RANK/WORLD_SIZE set) leave it out")
    command = launch_command(nproc, argv)
    print("launching: " + " ".join(command), flush=True)
    proc = subprocess.Popen(command)
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
        signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum)),
    }
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
