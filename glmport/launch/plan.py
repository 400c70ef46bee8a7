"""What a multi-process launch will do, decided before anything starts, and printed by ``--dry-run``.

Every check a launch can make without starting a process is made here, so that a wrong flag is one clear
error instead of N processes failing together: the config and the backend (as a run reads them), the
number of processes against the devices the backend sees (one process per device, except on the host
CPU), ``--devices`` against what exists, multi-node flags that agree with each other, DeepSpeed.

``--dry-run`` may describe a launch for another machine (a CUDA launch typed on a laptop): a backend that
is not available here is then reported, not refused, and what cannot be checked here is said so.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import socket
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from glmport.backend import Backend
from glmport.errors import BackendUnavailable, ConfigError, Problem

DEFAULT_PORT = 29500  # torchrun's, for multi-node launches where no port is given
# After a signal, how long torchrun's agent lets the ranks finish their step and write its checkpoint before it
# kills them (its default, 30 s, is too short for a large model's checkpoint). A scheduler's own grace period
# (Kubernetes' terminationGracePeriodSeconds, Slurm's --signal) still ends it sooner. A rank failing is not a
# signal: torchrun then stops the others at once.
STOP_GRACE_S = 900
LOG_PREFIX = "[rank${rank}]:"  # torchrun's template for the lines it copies from each process
# The launcher's own flags: the workers get the command without them.
LAUNCH_FLAGS = ("--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port", "--devices",
                "--dry-run")


@dataclass
class LaunchRequest:
    """The launch flags of ``glmport train``."""

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    devices: str | None = None
    dry_run: bool = False


@dataclass
class LaunchPlan:
    backend: Backend
    request: LaunchRequest
    master_addr: str
    master_port: int
    environment: dict[str, str]  # set for every process, on every node
    worker_args: list[str]  # `glmport ...` arguments of each process
    run_id: str
    log_dir: Path
    notes: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.request.nnodes * self.request.nproc_per_node

    def torchrun_args(self, node_rank: int | None = None) -> list[str]:
        """The arguments of ``python -m torch.distributed.run`` for node ``node_rank`` (this node's by default)."""
        rank = self.request.node_rank if node_rank is None else node_rank
        return [
            "--nnodes", str(self.request.nnodes), "--node-rank", str(rank),
            "--nproc-per-node", str(self.request.nproc_per_node),
            # the static rendezvous at node 0's address: every node knows its rank (a job controller's PET_*
            # variables, which torchrun would read for flags left out, change nothing)
            "--rdzv-backend", "static", "--master-addr", self.master_addr, "--master-port", str(self.master_port),
            "--rdzv-id", self.run_id,
            "--max-restarts", "0",  # a failed rank stops the run; `--resume yes` continues it
            *(["--shutdown-timeout", str(STOP_GRACE_S)] if _torchrun_has("--shutdown-timeout") else []),
            "--tee", "3", "--log-dir", str(self.log_dir),  # each rank's output on the console and in a file
            "-m", "glmport", *self.worker_args,
        ]

    def command(self, node_rank: int | None = None) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", *self.torchrun_args(node_rank)]

    def placement(self) -> list[str]:
        """``rank R: device`` for every process of the run."""
        n = self.request.nproc_per_node
        return [f"rank {node * n + local}: node {node}, {self.backend.device_name(local)}"
                for node in range(self.request.nnodes) for local in range(n)]

    def render(self) -> str:
        """The ``--dry-run`` text: the plan, then the exact command and environment for each node."""
        backend = self.backend
        collective = backend.collective_backend
        if backend.process_group_backend() != collective:
            collective += f" (run as {backend.process_group_backend()} by the emulator)"
        lines = [f"glmport train: {self.world_size} process(es), {self.request.nproc_per_node} on each of "
                 f"{self.request.nnodes} node(s); backend {backend.name}{' (emulated)' if backend.emulated else ''}, "
                 f"collective {collective}, rendezvous {self.master_addr}:{self.master_port}"]
        lines += [f"  {line}" for line in self.placement()]
        lines += [f"  note: {note}" for note in self.notes]
        for node in range(self.request.nnodes):
            here = " (this node)" if node == self.request.node_rank else ""
            lines += ["", f"# node {node}{here}", render_command(self.environment, self.command(node))]
        return "\n".join(lines)


@functools.cache
def _torchrun_has(flag: str) -> bool:
    """Whether this torch's ``torch.distributed.run`` takes ``flag`` (newer flags are left out on older torch)."""
    from torch.distributed.run import get_args_parser

    return flag in get_args_parser()._option_string_actions


def render_command(environment: dict[str, str], command: list[str]) -> str:
    """``env VAR=value ... command``, quoted for a POSIX shell: runs as printed."""
    words = ["env", *(f"{key}={value}" for key, value in sorted(environment.items())), *command]
    return " \\\n    ".join(_chunks([shlex.quote(word) for word in words]))


def _chunks(words: list[str], width: int = 100) -> list[str]:
    lines, line = [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*lines, line] if line else lines


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def plan_launch(request: LaunchRequest, backend: Backend, worker_args: list[str], *, deepspeed=None,
                environ=None) -> LaunchPlan:
    """Check ``request`` against ``backend`` and decide the launch. ``deepspeed`` is the backend's
    :class:`~glmport.deepspeed_info.DeepSpeedInfo` when the config asks for DeepSpeed."""
    env_in = os.environ if environ is None else environ
    notes: list[str] = []
    _check_nodes(request)
    available = backend.availability()
    if not available.available:
        if not request.dry_run:
            raise BackendUnavailable(f"backend {backend.name} is not available: {available.reason}")
        notes.append(f"backend {backend.name} is not available here ({available.reason}): the commands are for a "
                     "host where it is; the devices there are not checked")
    visible = _visible_devices(request, backend, available.available, env_in)
    environment = backend.launch_environment(visible)
    if deepspeed is not None:
        environment["DS_ACCELERATOR"] = deepspeed.accelerator
        if not deepspeed.usable:
            notes.append(f"DeepSpeed: {deepspeed.note}")
    if "OMP_NUM_THREADS" not in env_in:  # torchrun would set 1; the host's cores shared out do better on CPUs
        environment["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // request.nproc_per_node))
    environment["TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"] = LOG_PREFIX

    if request.nnodes > 1:
        addr = request.master_addr
        port = request.master_port or DEFAULT_PORT
        if request.master_port is None:
            notes.append(f"--master-port not given: every node uses {DEFAULT_PORT}")
    else:
        addr = request.master_addr or "127.0.0.1"
        port = request.master_port or free_port()
    # Every node must name the same rendezvous: torchrun keys its store by this id, and nodes that each drew
    # their own waited for each other forever. The master's address and port identify one job; the log
    # folder stays unique to this launch.
    run_id = "glmport-" + re.sub(r"[^A-Za-z0-9_.-]", "-", f"{addr}-{port}")
    log_dir = Path(tempfile.gettempdir()) / f"{run_id}-{uuid.uuid4().hex[:8]}"
    return LaunchPlan(backend, request, addr, port, environment, worker_args, run_id, log_dir, notes)


def _check_nodes(request: LaunchRequest) -> None:
    problems = []
    if request.nproc_per_node < 1:
        problems.append(Problem("--nproc-per-node", f"{request.nproc_per_node}: at least 1 process per node"))
    if request.nnodes < 1:
        problems.append(Problem("--nnodes", f"{request.nnodes}: at least 1 node"))
    elif not 0 <= request.node_rank < request.nnodes:
        problems.append(Problem("--node-rank", f"{request.node_rank} is not a node of --nnodes {request.nnodes}",
                                f"number the nodes 0 to {request.nnodes - 1}; node 0 hosts the rendezvous"))
    if request.nnodes > 1 and not request.master_addr:
        problems.append(Problem("--master-addr", f"--nnodes {request.nnodes} needs the address of node 0",
                                "pass --master-addr HOST (node 0's name or IP, reachable from every node) and the "
                                "same --master-port on every node"))
    if request.master_port is not None and not 0 < request.master_port < 65536:
        problems.append(Problem("--master-port", f"{request.master_port} is not a TCP port"))
    if problems:
        raise ConfigError("the launch flags do not fit together", problems)


def _visible_devices(request: LaunchRequest, backend: Backend, available: bool, environ) -> list[str] | None:
    """The visible-devices value each process gets, after checking that every process has a device of its
    own: ``--devices``, else the first N devices visible now (rank i binds device i), so the command says
    which devices the run uses. ``None`` for a backend without the variable (the host CPU)."""
    n = request.nproc_per_node
    var = backend.visible_devices_env
    mask = environ.get(var) if var else None
    shown = f" ({var}={mask!r})" if mask is not None else ""
    if request.devices is None:
        if not var or not backend.one_process_per_device:
            return None
        if available:
            count = backend.device_count()
            if n > count:
                raise ConfigError(f"--nproc-per-node {n}: only {count} {backend.name} device(s) are visible here"
                                  f"{shown}, and each process needs its own", [Problem(
                                      "--nproc-per-node", f"{n} processes for {count} device(s)",
                                      f"use --nproc-per-node {count} or fewer, or make more devices visible"
                                      + _emulation_hint(backend))])
        return _physical(list(range(n)), mask)
    if not var:
        raise ConfigError(f"--devices {request.devices}: backend {backend.name} has no devices to choose from "
                          "(its processes share the host); leave --devices out")
    ids = _device_ids(request.devices)
    if len(ids) < n:
        raise ConfigError(f"--devices {request.devices} names {len(ids)} device(s) for --nproc-per-node {n}: "
                          "each process needs its own", [Problem("--devices", f"{len(ids)} device(s) for {n} processes",
                                                                 f"name {n} devices, or lower --nproc-per-node")])
    if available:
        count = backend.device_count()
        missing = [i for i in ids if i >= count]
        if missing:
            raise ConfigError(f"--devices {request.devices}: {backend.name} device(s) {missing} do not exist here: "
                              f"{count} visible{shown}", [Problem("--devices", "devices are numbered from 0 among "
                                                                  "those visible", _emulation_hint(backend).strip(" ;"))])
    return _physical(ids, mask)


def _physical(ids: list[int], mask: str | None) -> list[str]:
    """Device numbers among those visible now, as the visible-devices variable names them: through the mask
    already set (a mask of ``2,3`` makes device 1 ``3``), else as they are."""
    if mask is None:
        return [str(i) for i in ids]
    entries = [entry.strip() for entry in mask.split(",")]
    missing = [i for i in ids if i >= len(entries)]
    if missing:
        raise ConfigError(f"device(s) {missing} are not among the {len(entries)} that the visible-devices "
                          f"variable leaves ({mask!r})")
    return [entries[i] for i in ids]


def _device_ids(text: str) -> list[int]:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or not all(part.isdigit() for part in parts):
        raise ConfigError(f"--devices {text!r}: expected device numbers separated by commas, e.g. --devices 0,1")
    ids = [int(part) for part in parts]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"--devices {text!r} names a device twice: each process needs its own")
    return ids


def _emulation_hint(backend: Backend) -> str:
    return "; an emulated host has GLMPORT_EMULATE_DEVICE_COUNT devices" if backend.emulated else ""
