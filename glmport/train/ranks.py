"""The processes of one run: who this process is among them, and how they agree.

A launcher (``glmport train --nproc-per-node``, ``torchrun``, the ``deepspeed`` launcher, a cluster's job
controller running one of those) starts every process with ``LOCAL_RANK``, ``RANK``, ``WORLD_SIZE`` and
the rendezvous address in its environment. :meth:`Ranks.from_environ` reads them; a single process is
``Ranks()`` and every method below is then free.

The rules the recipe follows, and the tools here that keep them without a rank ever hanging:

* every rank checks the inputs: :meth:`Ranks.agree` runs a step on every rank and then shares how it went,
  so a rank that found a bad file stops every rank with the same message instead of leaving the others
  waiting in a collective;
* only rank 0 writes shared outputs and takes decisions (which checkpoint to resume): it runs them inside
  ``agree`` and :meth:`Ranks.share` hands the result to the others;
* where every rank must do something in turn (remote code is copied into a per-node cache), the node's
  first rank goes first (:meth:`Ranks.local_first`).

The process group is initialized once, early (:meth:`Ranks.connect`), with the collective the backend
declares; accelerate, transformers and DeepSpeed find it initialized and use it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from glmport.errors import ConfigError, GlmportError

log = logging.getLogger("glmport")

T = TypeVar("T")
LAUNCH_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


class RankFailed(GlmportError):
    """Another rank of this run stopped; this one stops with the same exit status and its message."""

    def __init__(self, rank: int, message: str, exit_code: int):
        super().__init__(f"rank {rank} stopped the run: {message}")
        self.exit_code = exit_code


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world_size} (local rank {self.local_rank} of {self.local_world_size})"

    # --- who am I ---------------------------------------------------------------------------------------
    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Ranks:
        """This process's place in the run, from the launcher's variables (a single process when unset)."""
        env = os.environ if environ is None else environ
        values = {}
        for name in LAUNCH_VARIABLES:
            raw = env.get(name)
            if raw is None:
                continue
            try:
                values[name] = int(raw)
            except ValueError:
                raise ConfigError(f"{name}={raw!r} in the environment: a launcher sets it to a whole number; "
                                  "unset it, or start the run through a launcher") from None
        world = values.get("WORLD_SIZE", 1)
        if "LOCAL_RANK" not in values:
            if world > 1:
                # A job controller (Kubeflow's PyTorchJob) sets WORLD_SIZE and RANK per pod for a launcher to read.
                raise ConfigError(
                    f"WORLD_SIZE={world} is set, but this process was not started by a launcher (no LOCAL_RANK)\n"
                    "    -> start it with glmport train ... --nproc-per-node N --nnodes M --node-rank R "
                    "--master-addr A --master-port P (or through torchrun / the deepspeed launcher)")
            return cls()
        local_rank = values["LOCAL_RANK"]
        rank = values.get("RANK", local_rank)
        local_world = values.get("LOCAL_WORLD_SIZE", world)
        if not (0 <= rank < world and 0 <= local_rank < local_world <= world):
            raise ConfigError(f"inconsistent launcher variables: RANK={rank} LOCAL_RANK={local_rank} "
                              f"WORLD_SIZE={world} LOCAL_WORLD_SIZE={local_world}")
        return cls(rank, local_rank, world, local_world)

    # --- the process group --------------------------------------------------------------------------------
    def connect(self, backend, timeout_s: float = 1800) -> None:
        """Bind this process to its device and join the process group with the backend's collective.

        Logs, from rank 0, where every rank runs (gathered, so a wrong binding shows in one place)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        backend.set_device(self.local_rank)
        collective = backend.process_group_backend()
        if not dist.is_initialized():
            dist.init_process_group(backend=collective, timeout=timedelta(seconds=timeout_s))
        where = self.gather(f"{self.rank}: {backend.device_name(self.local_rank)} on {socket.gethostname()}")
        if self.is_main:
            declared = backend.collective_backend
            how = declared if declared == collective else f"{declared}, run as {collective} by the emulator"
            log.info("%d processes, collective %s; rank %s", self.world_size, how, ", rank ".join(where))

    def close(self, finished: bool = True) -> None:
        """Leave the process group. After a run that finished, every rank first waits for the others: a gloo
        rank whose peer has already torn its connections down can abort at exit ("terminate called without
        an active exception") instead of returning 0. After an error there is no waiting (a peer may be stuck
        in a collective that never completes); the launcher stops the others."""
        if not self.distributed:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            return
        if finished:
            dist.barrier()
        dist.destroy_process_group()

    # --- agreeing -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def agree(self):
        """Run the block on every rank, then compare: if it failed anywhere, it fails everywhere.

        The rank that failed raises its own error; the others raise :class:`RankFailed` with its message and
        exit status. Only errors are shared: a signal (``KeyboardInterrupt``) goes up at once, and the
        launcher stops the other ranks."""
        if not self.distributed:
            yield
            return
        failure: tuple[int, str, int] | None = None
        try:
            yield
        except Exception as exc:
            code = exc.exit_code if isinstance(exc, GlmportError) else 1
            text = str(exc) if isinstance(exc, GlmportError) else f"{type(exc).__name__}: {exc}"
            failure = (self.rank, text, code)
            self.gather(failure)
            raise
        failures = [f for f in self.gather(failure) if f is not None]
        if failures:
            rank, text, code = failures[0]
            raise RankFailed(rank, text, code)

    def on_main(self, step: Callable[[], T]) -> T:
        """Run ``step`` on rank 0 only, inside :meth:`agree`, and hand its result to every rank."""
        result = None
        with self.agree():
            if self.is_main:
                result = step()
        return self.share(result)

    def local_first(self, step: Callable[[], T]) -> T:
        """Run ``step`` on the first rank of each node, then on the others (each phase agreed)."""
        result = None
        for turn in (True, False):
            with self.agree():
                if self.is_local_main == turn:
                    result = step()
        return result

    # --- moving small objects -------------------------------------------------------------------------------
    def share(self, value: T) -> T:
        """Rank 0's ``value``, on every rank."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def any_of(self, flags: list[bool], device) -> list[bool]:
        """For each flag, whether it is true on any rank (one collective for all of them). ``device`` is where
        the process group's collective moves tensors (the Trainer's ``args.device``)."""
        if not self.distributed:
            return list(flags)
        import torch
        import torch.distributed as dist

        values = torch.tensor([1 if flag else 0 for flag in flags], dtype=torch.int32, device=device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return [bool(v) for v in values.tolist()]
