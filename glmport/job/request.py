"""What ``glmport job render`` is asked for, checked flag by flag before anything is rendered.

Every problem with the flags is collected (with the flag it comes from) so that the user fixes them in one
round, as with a config file. Names that end up in Kubernetes objects are checked against the API server's
own rules: a job name becomes the service name ``<name>-master-0`` (an RFC 1035 label, at most 63
characters), claims and priority classes are RFC 1123 subdomains.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from glmport.errors import Problem

KINDS = ("pytorchjob", "slurm")
SCHEDULERS = ("kueue", "volcano")
# The training-operator's replica restart policies; ExitCode restarts a pod only for exit statuses >= 128
# (signals: SIGTERM preemption is glmport's 130, the OOM killer's 137) and fails the job at once for 1-127,
# which is every other glmport exit status (bad input, backend unavailable, 64-bit refusal, divergence).
RESTART_POLICIES = ("OnFailure", "ExitCode")
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # RFC 1123 label
_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # RFC 1035 label: what a Service name must be
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m)?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_QUALIFIED_NAME = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$")  # registry/name:tag@digest, nothing a file could misread
_SLURM_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")  # partitions, QOS, GRES names
_SLURM_TIME = re.compile(r"^(\d+|\d+:\d{2}(:\d{2})?|\d+-\d{1,2}(:\d{2}(:\d{2})?)?|UNLIMITED|INFINITE)$")
# `<name>-worker-<index>` must stay a 63-character label for up to 9999 workers.
MAX_NAME = 63 - len("-worker-") - 4


@dataclass(frozen=True)
class Volume:
    """Where one of the job's folders comes from: a PersistentVolumeClaim (optionally a folder inside it),
    or a path on the nodes (a Kubernetes ``hostPath``; on Slurm, the path itself)."""

    claim: str | None = None
    sub_path: str | None = None
    host_path: str | None = None

    @property
    def describe(self) -> str:
        if self.claim:
            return f"claim {self.claim}" + (f" (folder {self.sub_path})" if self.sub_path else "")
        return f"host path {self.host_path}"


@dataclass(frozen=True)
class Toleration:
    key: str
    value: str | None
    effect: str | None

    def as_kubernetes(self) -> dict:
        spec = {"key": self.key, "operator": "Equal" if self.value is not None else "Exists"}
        if self.value is not None:
            spec["value"] = self.value
        if self.effect:
            spec["effect"] = self.effect
        return spec


@dataclass
class JobRequest:
    """The command line of ``glmport job render`` (see :mod:`glmport.cli.job` for each flag's help)."""

    config: Path
    overrides: list[str] = field(default_factory=list)
    kind: str = "pytorchjob"
    backend: str | None = None
    nnodes: int = 1
    nproc_per_node: int = 1
    image: str | None = None
    name: str | None = None
    namespace: str | None = None
    queue: str | None = None
    scheduler: str = "kueue"
    priority: str | None = None
    model: Volume | None = None
    data: Volume | None = None
    output: Volume | None = None
    shared_host_path: bool = False
    master_port: int | None = None  # default: the training-operator's 23456, torchrun's 29500 on Slurm
    accelerator_resource: str | None = None
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[Toleration] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    restart_policy: str = "OnFailure"
    max_restarts: int = 3
    grace_period: int = 300
    shm_size: str | None = None  # default 16Gi (PyTorchJob only)
    cpus: int | None = None
    memory: str | None = None
    time_limit: str | None = None


def parse_volume(text: str, flag: str, problems: list[Problem]) -> Volume:
    """``--X-pvc CLAIM[:FOLDER]`` (a claim name has no colon) or ``--X-dir PATH``. An invalid one is reported
    and comes back empty (the folder was given, wrongly: not missing)."""
    if flag.endswith("-dir"):
        if not text.startswith("/"):
            problems.append(Problem(flag, f"{text!r} is not an absolute path",
                                    "give the folder's absolute path as the nodes see it"))
            return Volume()
        return Volume(host_path=text.rstrip("/") or "/")
    claim, _, sub_path = text.partition(":")
    ok = True
    if not _SUBDOMAIN.match(claim) or len(claim) > 253:
        problems.append(Problem(flag, f"{claim!r} is not a valid PersistentVolumeClaim name",
                                "lower-case letters, digits, '-' and '.'; e.g. models or team-data"))
        ok = False
    if sub_path:
        parts = PurePosixPath(sub_path).parts
        if sub_path.startswith("/") or ".." in parts:
            problems.append(Problem(flag, f"folder {sub_path!r} must be relative to the claim's root, without '..'",
                                    f"e.g. {claim}:chatglm3-6b"))
            ok = False
    return Volume(claim=claim, sub_path=sub_path or None) if ok else Volume()


def parse_key_values(items: list[str], flag: str, problems: list[Problem], *, env: bool = False) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        valid = _ENV_NAME.match(key) if env else _QUALIFIED_NAME.match(key)
        if not sep or not valid:
            what = "a variable name" if env else "a label key"
            problems.append(Problem(flag, f"{item!r} is not KEY=VALUE with {what} as KEY",
                                    "e.g. " + ("NCCL_DEBUG=INFO" if env else "accelerator=h100")))
            continue
        result[key] = value
    return result


def parse_toleration(text: str, problems: list[Problem]) -> Toleration | None:
    """``KEY[=VALUE][:EFFECT]``, the way ``kubectl taint`` writes a taint."""
    body, _, effect = text.partition(":")
    key, eq, value = body.partition("=")
    if not _QUALIFIED_NAME.match(key) or (effect and effect not in TAINT_EFFECTS):
        problems.append(Problem("--toleration", f"{text!r} is not KEY[=VALUE][:EFFECT]",
                                f"EFFECT is one of {', '.join(TAINT_EFFECTS)}; e.g. dedicated=ml:NoSchedule"))
        return None
    return Toleration(key, value if eq else None, effect or None)


def check_request(request: JobRequest) -> list[Problem]:
    """Problems with the flags alone (the config and the backend are checked by the caller)."""
    problems: list[Problem] = []
    if request.kind not in KINDS:
        problems.append(Problem("--kind", f"{request.kind!r} is not one of {', '.join(KINDS)}"))
    for flag, value in (("--nnodes", request.nnodes), ("--nproc-per-node", request.nproc_per_node)):
        if value < 1:
            problems.append(Problem(flag, f"{value}: must be 1 or more"))
    if request.master_port is not None and not 1 <= request.master_port <= 65535:
        problems.append(Problem("--master-port", f"{request.master_port}: not a TCP port (1-65535)"))
    if request.max_restarts < 0:
        problems.append(Problem("--max-restarts", f"{request.max_restarts}: must be 0 or more"))
    if request.grace_period < 0:
        problems.append(Problem("--grace-period", f"{request.grace_period}: must be 0 or more seconds"))
    if request.name is not None and (not _NAME.match(request.name) or len(request.name) > MAX_NAME):
        problems.append(Problem("--name", f"{request.name!r} cannot name the job's pods and services",
                                f"lower-case letters, digits and '-', starting with a letter, at most {MAX_NAME} "
                                "characters"))
    if request.image is not None and not _IMAGE.match(request.image):
        problems.append(Problem("--image", f"{request.image!r} is not an image reference",
                                "e.g. registry.example.com/team/glmport:cuda"))
    if request.cpus is not None and request.cpus < 1:
        problems.append(Problem("--cpus", f"{request.cpus}: must be 1 or more"))
    for flag, quantity in (("--shm-size", request.shm_size), ("--memory", request.memory)):
        if quantity is not None and not _QUANTITY.match(quantity):
            problems.append(Problem(flag, f"{quantity!r} is not a size", "e.g. 16Gi or 500Mi"))
    if request.kind == "pytorchjob":
        problems += _check_kubernetes(request)
    else:
        problems += _check_slurm(request)
    return problems


def _check_kubernetes(request: JobRequest) -> list[Problem]:
    problems = []
    if not request.image:
        problems.append(Problem("--image", "a PyTorchJob needs the image its pods run",
                                "build one from docker/ (docker/README.md) and push it where the cluster pulls from"))
    for flag, value in (("--namespace", request.namespace),):
        if value is not None and (not _LABEL.match(value) or len(value) > 63):
            problems.append(Problem(flag, f"{value!r} is not a valid namespace name"))
    for flag, value in (("--queue", request.queue), ("--priority", request.priority)):
        if value is not None and (not _SUBDOMAIN.match(value) or len(value) > 253):
            problems.append(Problem(flag, f"{value!r} is not a valid Kubernetes object name",
                                    "lower-case letters, digits, '-' and '.'"))
    resource = request.accelerator_resource
    if resource is not None and not _QUALIFIED_NAME.match(resource):
        problems.append(Problem("--accelerator-resource", f"{resource!r} is not a Kubernetes resource name",
                                "e.g. nvidia.com/gpu or cambricon.com/mlu370"))
    if request.queue and request.scheduler not in SCHEDULERS:
        problems.append(Problem("--scheduler", f"{request.scheduler!r} is not one of {', '.join(SCHEDULERS)}"))
    if request.restart_policy not in RESTART_POLICIES:
        problems.append(Problem("--restart-policy", f"{request.restart_policy!r} is not one of "
                                f"{', '.join(RESTART_POLICIES)}"))
    if request.time_limit:
        problems.append(Problem("--time", "a Slurm time limit; a PyTorchJob has none",
                                "leave it out, or render --kind slurm"))
    for what, volume in (("model", request.model), ("data", request.data), ("output", request.output)):
        if volume is None:
            problems.append(Problem(f"--{what}-pvc / --{what}-dir", f"the pods need the {what} folder",
                                    f"--{what}-pvc CLAIM[:FOLDER] (a PersistentVolumeClaim) or --{what}-dir PATH "
                                    "(a path on every node)"))
    output = request.output
    if output is not None and output.host_path and request.nnodes > 1 and not request.shared_host_path:
        problems.append(Problem(
            "--output-dir",
            f"{output.host_path} is a path on each node: with --nnodes {request.nnodes} every node would write "
            "its own part of the checkpoints there, and a restarted pod may land on a node that has none of them",
            "use a ReadWriteMany claim (--output-pvc), or pass --shared-host-path if the path is one shared file "
            "system mounted on every node"))
    return problems


def _check_slurm(request: JobRequest) -> list[Problem]:
    problems = []
    for flag, value in (("--queue", request.queue), ("--priority", request.priority),
                        ("--accelerator-resource", request.accelerator_resource)):
        if value is not None and not _SLURM_NAME.match(value):
            problems.append(Problem(flag, f"{value!r} is not a Slurm name", "letters, digits, '_', '-', '.', '+'"))
    if request.time_limit is not None and not _SLURM_TIME.match(request.time_limit):
        problems.append(Problem("--time", f"{request.time_limit!r} is not a Slurm time limit",
                                "MINUTES, HH:MM:SS or DAYS-HH:MM:SS, e.g. 1-00:00:00"))
    for what, volume in (("model", request.model), ("data", request.data), ("output", request.output)):
        if volume is not None and volume.claim:
            problems.append(Problem(f"--{what}-pvc", "a Slurm job reads folders by path",
                                    f"use --{what}-dir PATH (on a file system every node mounts)"))
    kubernetes_only = (("--namespace", request.namespace), ("--scheduler", request.scheduler != "kueue" or None),
                       ("--node-selector", request.node_selector or None),
                       ("--toleration", request.tolerations or None),
                       ("--restart-policy", request.restart_policy != "OnFailure" or None),
                       ("--shm-size", request.shm_size))
    for flag, value in kubernetes_only:
        if value is not None:
            problems.append(Problem(flag, "a Kubernetes setting; a Slurm job has no such thing",
                                    "leave it out with --kind slurm"))
    return problems
