"""From a checked request and training config to what every node of the job runs.

Both kinds of job run one ``glmport train`` command per node, the same on every node: glmport's launcher
(``--nproc-per-node``, ``--nnodes``, ``--node-rank``, ``--master-addr``, ``--master-port``) starts that
node's processes through torchrun, so a cluster job behaves exactly like a run started by hand on each
node. Only the node rank and the first node's address differ between nodes, and each scheduler provides
them in its own way (see :mod:`glmport.job.pytorchjob` and :mod:`glmport.job.slurm`).

Every start passes ``--resume yes``: a job restarted after a failure or a preemption continues from the
latest complete checkpoint (or starts fresh when there is none), and a finished run is published as it is.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from glmport.config import RunConfig, _check_files, read_run_config
from glmport.errors import ConfigError, Problem
from glmport.job.request import MAX_NAME, JobRequest, check_request

# The folders' paths inside a container (the PyTorchJob's pods, a Slurm job with --image).
CONTAINER_DATA, CONTAINER_MODEL, CONTAINER_OUTPUT, CONTAINER_CONFIG = "/data", "/model", "/output", "/config"

# What the nodes ask their scheduler for, per device type of the builtin backends: the extended resource
# each vendor's Kubernetes device plugin registers (NVIDIA's k8s-device-plugin; Cambricon's
# cambricon-k8s-device-plugin in its default mode: with --enable-device-type it registers a per-model name
# such as cambricon.com/mlu370, in env-share mode cambricon.com/mlu.share), and the usual Slurm GRES names
# (site-defined: check `sinfo -o %G`). --accelerator-resource names any other.
DEVICE_RESOURCES = {
    "pytorchjob": {"cuda": "nvidia.com/gpu", "mlu": "cambricon.com/mlu"},
    "slurm": {"cuda": "gpu", "mlu": "mlu"},
}
DEFAULT_MASTER_PORT = {"pytorchjob": 23456, "slurm": 29500}  # the training-operator's default; torchrun's
DEFAULT_SHM_SIZE = "16Gi"
_CONFIGMAP_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")


@dataclass
class Mount:
    """A host file or folder the job's container sees at ``target`` (Slurm with --image)."""

    source: str
    target: str
    read_only: bool = True


@dataclass
class JobPlan:
    """Everything the renderers need, decided once."""

    request: JobRequest
    config: RunConfig
    name: str
    backend: str
    accelerator_resource: str | None
    master_port: int
    data: str  # paths as the training command sees them
    model: str
    config_path: str
    output_dir: str
    host_output_dir: str | None  # Slurm: the run folder on the shared file system
    deepspeed: Path | None  # the DeepSpeed JSON on this machine, when the config names a file
    deepspeed_path: str | None  # ... and where the job reads it
    overrides: list[str]  # KEY=VALUE passed to glmport train: the user's, then the job's own
    mounts: list[Mount] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def train_command(self, *, master_addr: str, node_rank: str | None) -> list[str]:
        """The command every node runs. ``node_rank=None`` leaves ``--node-rank`` to be appended by the
        node itself (Slurm reads it from each task's environment)."""
        command = ["glmport", "train", self.data, self.model, self.config_path,
                   "--backend", self.backend, "--resume", "yes",
                   "--nproc-per-node", str(self.request.nproc_per_node), "--nnodes", str(self.request.nnodes),
                   "--master-addr", master_addr, "--master-port", str(self.master_port)]
        if node_rank is not None:
            command += ["--node-rank", node_rank]
        return command + self.overrides


def plan_job(request: JobRequest, manager, problems: list[Problem] | None = None) -> JobPlan:
    """Check the request, the training config and the backend together; every problem (with those found
    while parsing the flags, ``problems``) is raised in one :class:`ConfigError` naming the flag, or the
    config file and line."""
    flag_problems = list(problems or []) + check_request(request)
    config, config_problems = _read_config(request)
    problems = config_problems + flag_problems

    backend_name = request.backend or config.glmport.backend
    backend = None
    if backend_name in (None, "", "auto"):
        problems.append(Problem("--backend", "the job needs to know which device its nodes have",
                                f"--backend {' or '.join(manager.backends.names())} (auto-selection happens on the "
                                "machine that runs it, and this one is not the cluster's)"))
    elif backend_name not in manager.backends.names():
        problems.append(Problem("--backend", f"unknown backend {backend_name!r}",
                                f"one of {', '.join(manager.backends.names())} (see `glmport backends`)"))
    else:
        backend = manager.backends.get(backend_name)
    kind = request.kind if request.kind in DEVICE_RESOURCES else "pytorchjob"
    resource = request.accelerator_resource
    if backend is not None and resource is None and backend.device_type != "cpu":
        resource = DEVICE_RESOURCES[kind].get(backend.device_type)
        if resource is None:
            problems.append(Problem("--accelerator-resource", f"glmport does not know what the {backend.name} "
                                    f"backend's devices are called on {'Kubernetes' if kind == 'pytorchjob' else 'Slurm'}",
                                    "name it, e.g. --accelerator-resource huawei.com/Ascend910"))
    for key in ("init_model", "synthetic_data"):
        if getattr(config.glmport, key):
            problems.append(Problem(config.locate(f"glmport.{key}"), f"glmport.{key}: a cluster job trains on a model "
                                    "and data that exist; every node would try to create them",
                                    "build them once beforehand (glmport init-model, or a quick-start run), then "
                                    "remove the key"))
    ds = config.training_args.get("deepspeed")
    if request.kind == "pytorchjob":
        for key, shipped in (("", config.path), ("training_args.deepspeed", Path(ds) if isinstance(ds, str) else None)):
            if shipped is not None and not _CONFIGMAP_KEY.match(shipped.name):
                problems.append(Problem(config.locate(key) if key else str(config.path),
                                        f"{shipped.name!r} cannot name a file in the job's ConfigMap",
                                        "rename the file: letters, digits, '-', '_' and '.'"))
    if isinstance(ds, str) and Path(ds).name == config.path.name:
        problems.append(Problem(config.locate("training_args.deepspeed"), f"training_args.deepspeed: {ds} has the "
                                "config file's name; the job ships both side by side", "rename one of them"))
    if request.output is not None and any(_key(o) == "training_args.output_dir" for o in request.overrides):
        problems.append(Problem("training_args.output_dir", "set twice: by the override and by --output-*",
                                "leave the override out: the run writes to OUTPUT/<job name>"))
    if problems:
        raise ConfigError(f"cannot render the job: {len(problems)} problem(s)", problems)

    name = request.name or _default_name(config.path)
    plan = JobPlan(
        request=request, config=config, name=name, backend=backend.name, accelerator_resource=resource, master_port=request.master_port or DEFAULT_MASTER_PORT[kind],
        data="", model="", config_path="", output_dir="", host_output_dir=None, deepspeed=None, deepspeed_path=None,
        overrides=[],
    )
    _place(plan)
    plan.warnings = _shared_storage_notes(plan)
    return plan


def _shared_storage_notes(plan: JobPlan) -> list[str]:
    """What several nodes need from storage, which a manifest cannot check: said in the file and on stderr."""
    request = plan.request
    if request.nnodes < 2:
        return []
    shards = (f"all {request.nnodes} nodes write their part of each checkpoint there (DeepSpeed ZeRO-3 writes "
              "per-rank shards) and a restarted node must find all of them")
    if request.kind == "slurm":
        return [f"the output folder {plan.host_output_dir} must be on a file system every node mounts: {shards}"]
    notes = []
    if request.output.claim:
        notes.append(f"the output claim {request.output.claim} must be ReadWriteMany: {shards}")
    else:
        notes.append(f"--output-dir {request.output.host_path} must be one shared file system mounted there on "
                     f"every node (--shared-host-path): {shards}")
    readers = [v.claim for v in (request.model, request.data) if v.claim]
    if readers:
        notes.append(f"claim(s) {', '.join(dict.fromkeys(readers))} are mounted by {request.nnodes} pods on different "
                     "nodes at once: they must be ReadOnlyMany or ReadWriteMany")
    return notes


def _read_config(request: JobRequest) -> tuple[RunConfig, list[Problem]]:
    """The training config with its problems. A PyTorchJob's model and data are in the cluster's volumes:
    whether they exist cannot be seen from here, so those checks are left to the pods (where every rank
    checks them before training). A Slurm job's folders are on the shared file system, which the login
    node sees: they are checked."""
    host = {}
    if request.kind == "slurm":
        host = {"data_dir": request.data.host_path if request.data else None,
                "model_dir": request.model.host_path if request.model else None}
    config, problems = read_run_config(request.config, request.overrides, **host)
    if request.kind == "pytorchjob":
        # The same file checks run on this machine: drop what they report about the data and the model (the
        # DeepSpeed file stays checked: it is read here, to be shipped with the job).
        without_deepspeed = dataclasses.replace(
            config, training_args={k: v for k, v in config.training_args.items() if k != "deepspeed"})
        local: list[Problem] = []
        _check_files(without_deepspeed, local)
        problems = [p for p in problems if p not in local]
    return config, problems


def one_line(text) -> str:
    """``text`` as a comment line of the job file can hold it: control characters (a newline in a file
    name) written as escapes, so nothing it contains becomes a line of YAML or shell."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], str(text))


def _key(override: str) -> str:
    return override.partition("=")[0].strip()


def _default_name(config_path: Path) -> str:
    stem = re.sub(r"[^a-z0-9-]+", "-", config_path.stem.lower()).strip("-")
    return ("glmport-" + stem)[:MAX_NAME].rstrip("-") if stem else "glmport"


def _place(plan: JobPlan) -> None:
    """Decide the paths the command uses, the overrides that point the run at them, and (Slurm with an
    image) the mounts. The run writes to ``OUTPUT/<job name>``; a Slurm job without --output-dir writes
    where the config says (made absolute: the job may start in another folder)."""
    request, config = plan.request, plan.config
    ds = config.training_args.get("deepspeed")
    plan.deepspeed = Path(ds).absolute() if isinstance(ds, str) else None
    ds_name = plan.deepspeed.name if plan.deepspeed else None

    if request.kind == "pytorchjob":
        plan.data, plan.model = CONTAINER_DATA, CONTAINER_MODEL
        plan.config_path = f"{CONTAINER_CONFIG}/{config.path.name}"
        plan.output_dir = f"{CONTAINER_OUTPUT}/{plan.name}"
        plan.deepspeed_path = f"{CONTAINER_CONFIG}/{ds_name}" if ds_name else None
    else:
        data = request.data.host_path if request.data else str(config.data_dir.absolute())
        model = request.model.host_path if request.model else str(config.model_dir.absolute())
        if request.output:
            output = Path(request.output.host_path) / plan.name
        else:
            output = Path(str(config.training_args.get("output_dir") or "output")).absolute()
        config_file = str(config.path.absolute())
        plan.host_output_dir = str(output)
        if request.image:  # the same folders, mounted into the container at fixed places
            plan.mounts = [Mount(data, CONTAINER_DATA), Mount(model, CONTAINER_MODEL),
                           Mount(str(output), CONTAINER_OUTPUT, read_only=False),
                           Mount(config_file, f"{CONTAINER_CONFIG}/{config.path.name}")]
            if plan.deepspeed:
                plan.mounts.append(Mount(str(plan.deepspeed), f"{CONTAINER_CONFIG}/{ds_name}"))
            unmountable = [m.source for m in plan.mounts if "," in m.source or ":" in m.source]
            if unmountable:  # pyxis reads --container-mounts as SOURCE:TARGET[:FLAGS],...
                raise ConfigError(f"--image: pyxis cannot mount a path with ',' or ':': {', '.join(unmountable)}; "
                                  "move or link it to a plain path")
            plan.data, plan.model = CONTAINER_DATA, CONTAINER_MODEL
            plan.config_path = f"{CONTAINER_CONFIG}/{config.path.name}"
            plan.output_dir = CONTAINER_OUTPUT
            plan.deepspeed_path = f"{CONTAINER_CONFIG}/{ds_name}" if ds_name else None
        else:
            plan.data, plan.model, plan.config_path, plan.output_dir = data, model, config_file, str(output)
            plan.deepspeed_path = str(plan.deepspeed) if plan.deepspeed else None

    replaced = {"training_args.output_dir"} | ({"training_args.deepspeed"} if plan.deepspeed else set())
    plan.overrides = [o for o in request.overrides if _key(o) not in replaced]
    plan.overrides.append(f"training_args.output_dir={plan.output_dir}")
    if plan.deepspeed_path:
        plan.overrides.append(f"training_args.deepspeed={plan.deepspeed_path}")
