"""``docker/launch.sh --dry-run``: the exact ``docker run`` command for each backend (no Docker engine needed).

The MLU device nodes are looked up in ``GLMPORT_DEV_DIR``, here a folder of stand-in files named like the
nodes Cambricon's driver creates (cambricon_ctl, cambricon_devN, cambricon_ipcmN, commuN).
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "docker" / "launch.sh"


def launch(*args, env=None, script=LAUNCH, cwd=None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "GLMPORT_DEV_DIR"}
    full_env.update(env or {})
    return subprocess.run(["bash", str(script), *map(str, args)], capture_output=True, text=True, env=full_env,
                          cwd=cwd, stdin=subprocess.DEVNULL)


def dry_run(*args, **kwargs) -> list[str]:
    done = launch("--dry-run", *args, **kwargs)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1, "one line"
    words = shlex.split(done.stdout)
    assert words[:3] == ["docker", "run", "--rm"]
    return words


def refused(*args, **kwargs) -> str:
    done = launch("--dry-run", *args, **kwargs)
    assert done.returncode == 2 and not done.stdout, (done.stdout, done.stderr)
    return done.stderr


def option_values(words: list[str], option: str) -> list[str]:
    return [words[i + 1] for i, w in enumerate(words) if w == option]


@pytest.fixture()
def folders(tmp_path):
    for name in ("model", "data"):
        (tmp_path / name).mkdir()
    (tmp_path / "lora.yaml").write_text("data_config: {}\n", encoding="utf-8")
    return tmp_path


@pytest.fixture()
def mlu_host(tmp_path):
    """Two MLU370 cards as the driver shows them: card 1 has a commu node, both an ipcm node."""
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("cambricon_ctl", "cambricon_dev0", "cambricon_dev1", "cambricon_ipcm0", "cambricon_ipcm1", "commu1"):
        (dev / name).touch()
    return dev


def test_cuda_train_with_the_folders_mounted(folders):
    words = dry_run("--backend", "cuda", "--model", folders / "model", "--data", folders / "data", "--config",
                    folders / "lora.yaml", "--output", folders / "runs", "--devices", "0,1", "--nproc-per-node", "2",
                    "train", "training_args.max_steps=5", cwd=folders)
    assert option_values(words, "--gpus") == ['"device=0,1"']  # docker's CSV syntax: the quotes are part of it
    assert option_values(words, "--shm-size") == ["16g"]
    assert option_values(words, "--mount") == [
        f"type=bind,source={folders / 'model'},target=/model,readonly",
        f"type=bind,source={folders / 'data'},target=/data,readonly",
        f"type=bind,source={folders / 'lora.yaml'},target=/config/lora.yaml,readonly",
        f"type=bind,source={folders / 'runs'},target=/output",
    ]
    image = words.index("glmport:cuda")
    assert words[image + 1:] == ["train", "/data", "/model", "/config/lora.yaml", "training_args.max_steps=5",
                                 "training_args.output_dir=/output", "--nproc-per-node", "2"]
    assert "--network" not in words and "-it" not in words  # no terminal here
    assert not (folders / "runs").exists(), "a dry run creates nothing"


def test_train_writes_to_the_output_mount_unless_told_otherwise(folders):
    words = dry_run("--backend", "cpu", "--output", folders / "runs", "train", "/config/x.yaml")
    assert words[-3:] == ["train", "/config/x.yaml", "training_args.output_dir=/output"]
    words = dry_run("--backend", "cpu", "--output", folders / "runs", "train", "/config/x.yaml",
                    "training_args.output_dir=/output/lora")
    assert words[-3:] == ["train", "/config/x.yaml", "training_args.output_dir=/output/lora"]


def test_relative_folders_are_mounted_by_absolute_path(folders):
    words = dry_run("--backend", "cpu", "--model", "model", "--image", "my/glmport:cpu", "env", cwd=folders)
    assert option_values(words, "--mount") == [f"type=bind,source={folders / 'model'},target=/model,readonly"]
    assert words[-2:] == ["my/glmport:cpu", "env"]


def test_explicit_train_arguments_are_left_alone(folders):
    words = dry_run("--backend", "cuda", "--config", folders / "lora.yaml", "--data", folders / "data", "--model",
                    folders / "model", "train", "/config/lora.yaml", "--nnodes", "2", "--node-rank", "1",
                    "--master-addr", "10.0.0.1", "--nproc-per-node", "8")
    assert words[words.index("glmport:cuda") + 1:] == ["train", "/config/lora.yaml", "--nnodes", "2", "--node-rank",
                                                       "1", "--master-addr", "10.0.0.1", "--nproc-per-node", "8"]
    assert option_values(words, "--network") == ["host"]  # the nodes must reach each other
    assert option_values(words, "--gpus") == ["all"]


def test_without_a_command_a_shell(folders):
    words = dry_run("--backend", "cpu", "--shm-size", "2g", "--name", "try", "-e", "A=b c", "--env", "HF_HOME=/hf")
    assert words[-3:] == ["--entrypoint", "bash", "glmport:cpu"]
    assert option_values(words, "--shm-size") == ["2g"] and option_values(words, "--name") == ["try"]
    assert option_values(words, "-e") == ["A=b c", "HF_HOME=/hf"]
    assert "-i" in words  # a shell reads its standard input even without a terminal


def test_mlu_passes_the_cambricon_device_nodes(mlu_host):
    words = dry_run("--backend", "mlu", "env", env={"GLMPORT_DEV_DIR": str(mlu_host)})
    assert option_values(words, "--device") == [
        f"{mlu_host}/{name}:/dev/{name}" for name in
        ("cambricon_ctl", "cambricon_dev0", "cambricon_ipcm0", "cambricon_dev1", "cambricon_ipcm1", "commu1")]
    assert "--gpus" not in words and words[-2:] == ["glmport:mlu", "env"]

    words = dry_run("--backend", "mlu", "--devices", "1", "env", env={"GLMPORT_DEV_DIR": str(mlu_host)})
    assert [v.split(":")[1] for v in option_values(words, "--device")] == [
        "/dev/cambricon_ctl", "/dev/cambricon_dev1", "/dev/cambricon_ipcm1", "/dev/commu1"]


def test_mlu_device_problems_are_named(mlu_host, tmp_path):
    env = {"GLMPORT_DEV_DIR": str(mlu_host)}
    assert "no " + str(mlu_host) + "/cambricon_dev5; cards here: 0 1" in refused("--backend", "mlu", "--devices", "0,5", env=env)
    assert "expected card numbers" in refused("--backend", "mlu", "--devices", "mlu0", env=env)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "is the Cambricon driver loaded" in refused("--backend", "mlu", env={"GLMPORT_DEV_DIR": str(empty)})


@pytest.mark.parametrize("args, message", [
    ((), "--backend is required"),
    (("--backend", "tpu"), "--backend tpu: expected cuda, mlu or cpu"),
    (("--backend", "cpu", "--devices", "0"), "the cpu backend has no devices"),
    (("--backend", "cpu", "--nproc-per-node", "2", "env"), "--nproc-per-node goes with the train command"),
    (("--backend", "cpu", "--nproc-per-node", "two", "train"), "--nproc-per-node two: expected a whole number"),
    (("--backend", "cpu", "--model", "/no/such/model", "env"), "--model /no/such/model: no such file or folder"),
    (("--backend", "cpu", "--bogus"), "unknown option --bogus"),
    (("--backend", "cpu", "-e", "NOT-A-VAR", "env"), "--env NOT-A-VAR: expected KEY=VALUE"),
    (("--backend",), "--backend needs a value"),
])
def test_bad_input_is_refused_with_the_flag_named(args, message):
    assert message in refused(*args)


@pytest.mark.parametrize("backend", ["cpu", "cuda", "mlu"])
def test_the_per_backend_scripts_are_launch_sh(backend, mlu_host, folders):
    env = {"GLMPORT_DEV_DIR": str(mlu_host)}
    args = ("--model", folders / "model", "--nproc-per-node", "2", "train", "run.yaml")
    assert dry_run(*args, script=REPO / "docker" / backend / "launch.sh", env=env) == \
        dry_run("--backend", backend, *args, env=env)


def test_help_is_the_header():
    done = launch("--help")
    assert done.returncode == 0 and done.stdout.startswith("Run glmport in the container of a backend")
    assert "--nproc-per-node N" in done.stdout and "set -euo" not in done.stdout
