"""A Kubeflow ``PyTorchJob`` (training-operator, ``kubeflow.org/v1``) that runs ``glmport train`` on N nodes.

One pod per node: replica ``Master`` (node rank 0) and ``Worker`` (nodes 1..N-1), each asking the device
plugin for ``--nproc-per-node`` devices and starting that many processes through glmport's launcher.

Which variables tell a pod who it is: the training-operator sets ``MASTER_ADDR`` (the master pod's
service, ``<name>-master-0``), ``MASTER_PORT`` (the master container's port named ``pytorchjob-port``)
and ``RANK`` (the replica's index: 0 for the master, 1.. for the workers, i.e. the node rank) on every
container named ``pytorch``, in every v1 release (1.5 to 1.9). Releases from 1.8 also set the ``PET_*``
variables that torchrun reads (``PET_NODE_RANK`` equal to ``RANK``, ``PET_NNODES``, and with
``nprocPerNode`` ``PET_NPROC_PER_NODE``), and from 1.7 ``WORLD_SIZE`` is nodes x ``nprocPerNode``. We use
the three that every release sets, and pass the node count and processes per node ourselves, so the same
manifest works on any 1.x operator. Kubernetes substitutes ``$(VAR)`` in ``args`` from the container's
environment (the operator's variables included), so no shell is needed between the pod and glmport.

The config file (and the DeepSpeed JSON it names) travel with the job in a ConfigMap mounted at /config:
the job runs exactly the config it was rendered from, whatever happens to the file afterwards.
"""

from __future__ import annotations

import yaml

from glmport import __version__
from glmport.errors import ConfigError
from glmport.job.plan import (
    CONTAINER_CONFIG,
    CONTAINER_DATA,
    CONTAINER_MODEL,
    CONTAINER_OUTPUT,
    DEFAULT_SHM_SIZE,
    JobPlan,
    one_line,
)
from glmport.job.request import Volume

API_VERSION = "kubeflow.org/v1"
KIND = "PyTorchJob"
CONTAINER = "pytorch"  # the operator sets its variables on, and reads the master port from, this container
PORT_NAME = "pytorchjob-port"
CONFIGMAP_LIMIT = 1024 * 1024  # what the API server stores in one ConfigMap
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


def documents(plan: JobPlan) -> list[dict]:
    """The ConfigMap with the config, then the PyTorchJob."""
    return [_configmap(plan), _pytorchjob(plan)]


def render(plan: JobPlan) -> str:
    request = plan.request
    lines = [
        f"# Rendered by `glmport job render` (glmport {__version__}) from {one_line(plan.config.path)}, backend {plan.backend}.",
        f"# A Kubeflow PyTorchJob ({API_VERSION}): {request.nnodes} node(s) x {request.nproc_per_node} "
        f"process(es) on {plan.accelerator_resource or 'CPU'}, image {request.image}.",
        "# Every pod runs the same `glmport train`; the training-operator gives each its node rank ($(RANK)) and",
        "# the master's address ($(MASTER_ADDR), $(MASTER_PORT)). A restarted pod resumes from the latest complete",
        "# checkpoint (--resume yes).",
        f"# Submit: kubectl apply -f FILE   Follow: kubectl logs -f {plan.name}-master-0"
        + (f" -n {request.namespace}" if request.namespace else ""),
    ]
    lines += [f"# NOTE: {one_line(warning)}" for warning in plan.warnings]
    return "\n".join(lines) + "\n" + yaml.dump_all(documents(plan), Dumper=_Dumper, sort_keys=False, width=1000)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the config in the ConfigMap) as literal blocks, readable in the manifest."""


def _str(dumper: yaml.SafeDumper, value: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def _metadata(plan: JobPlan, name: str, labels: dict | None = None) -> dict:
    meta: dict = {"name": name}
    if plan.request.namespace:
        meta["namespace"] = plan.request.namespace
    meta["labels"] = {"app.kubernetes.io/name": "glmport", "app.kubernetes.io/instance": plan.name, **(labels or {})}
    return meta


def _configmap(plan: JobPlan) -> dict:
    data = {plan.config.path.name: plan.config.path.read_text(encoding="utf-8")}
    if plan.deepspeed:
        data[plan.deepspeed.name] = plan.deepspeed.read_text(encoding="utf-8")
    size = sum(len(text.encode()) for text in data.values())
    if size > CONFIGMAP_LIMIT:
        raise ConfigError(f"{plan.config.path}: the config files add up to {size} bytes, more than a ConfigMap holds "
                          f"({CONFIGMAP_LIMIT}); put them on the data volume and pass their paths as overrides")
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(plan, f"{plan.name}-config"), "data": data}


def _pytorchjob(plan: JobPlan) -> dict:
    request = plan.request
    labels = {KUEUE_QUEUE_LABEL: request.queue} if request.queue and request.scheduler == "kueue" else {}
    replicas = {"Master": _replica(plan, 1)}
    if request.nnodes > 1:
        replicas["Worker"] = _replica(plan, request.nnodes - 1)
    run_policy: dict = {"backoffLimit": request.max_restarts}
    if request.scheduler == "volcano" and (request.queue or request.priority):
        # Read by the operator's gang scheduling (--gang-scheduler-name=volcano) for the job's PodGroup: all
        # nodes start together or none does.
        scheduling = {"queue": request.queue, "priorityClass": request.priority}
        run_policy["schedulingPolicy"] = {k: v for k, v in scheduling.items() if v}
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": _metadata(plan, plan.name, labels),
        "spec": {
            "nprocPerNode": str(request.nproc_per_node),
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": replicas,
        },
    }


def _replica(plan: JobPlan, replicas: int) -> dict:
    request = plan.request
    command = plan.train_command(master_addr="$(MASTER_ADDR)", node_rank="$(RANK)")
    command[command.index("--master-port") + 1] = "$(MASTER_PORT)"
    container: dict = {
        "name": CONTAINER,
        "image": request.image,
        "command": command[:1],
        "args": command[1:],
        "ports": [{"name": PORT_NAME, "containerPort": plan.master_port, "protocol": "TCP"}],
        "volumeMounts": [
            {"name": "model", "mountPath": CONTAINER_MODEL, "readOnly": True, **_sub_path(request.model)},
            {"name": "data", "mountPath": CONTAINER_DATA, "readOnly": True, **_sub_path(request.data)},
            {"name": "output", "mountPath": CONTAINER_OUTPUT, **_sub_path(request.output)},
            {"name": "config", "mountPath": CONTAINER_CONFIG, "readOnly": True},
            {"name": "shm", "mountPath": "/dev/shm"},
        ],
    }
    if request.env:
        container["env"] = [{"name": k, "value": v} for k, v in request.env.items()]
    resources: dict = {}
    if plan.accelerator_resource:
        resources["limits"] = {plan.accelerator_resource: request.nproc_per_node}
    requests = {k: v for k, v in (("cpu", request.cpus), ("memory", request.memory)) if v is not None}
    if requests:
        resources["requests"] = requests
    if resources:
        container["resources"] = resources
    pod: dict = {
        # SIGTERM (preemption, a drained node) lets the current step finish and a checkpoint be written
        # before the kubelet's SIGKILL.
        "terminationGracePeriodSeconds": request.grace_period,
        "containers": [container],
        "volumes": [
            _volume("model", request.model), _volume("data", request.data), _volume("output", request.output),
            {"name": "config", "configMap": {"name": f"{plan.name}-config"}},
            # Docker's and containerd's 64 MiB /dev/shm is too small for data-loader workers and the
            # collectives' shared-memory transport.
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": request.shm_size or DEFAULT_SHM_SIZE}},
        ],
    }
    if request.priority:
        pod["priorityClassName"] = request.priority
    if request.node_selector:
        pod["nodeSelector"] = dict(request.node_selector)
    if request.tolerations:
        pod["tolerations"] = [t.as_kubernetes() for t in request.tolerations]
    return {"replicas": replicas, "restartPolicy": request.restart_policy, "template": {"spec": pod}}


def _sub_path(volume: Volume | None) -> dict:
    return {"subPath": volume.sub_path} if volume is not None and volume.sub_path else {}


def _volume(name: str, volume: Volume) -> dict:
    if volume.claim:
        claim = {"claimName": volume.claim}
        if name in ("model", "data"):
            claim["readOnly"] = True
        return {"name": name, "persistentVolumeClaim": claim}
    return {"name": name, "hostPath": {"path": volume.host_path, "type": "Directory" if name != "output"
                                       else "DirectoryOrCreate"}}
