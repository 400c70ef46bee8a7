"""`glmport train --nproc-per-node`: what a launch will do, checked and printed without starting anything.

Dry runs for every builtin backend (cuda and mlu print their commands on this CPU-only machine: a dry run only
prints), the flags that cannot work refused before any process starts, and DeepSpeed's flavour and config
handled per backend. The runs themselves are in test_multiprocess.py.
"""

from __future__ import annotations

import json
import shlex

import pytest
from e2e_cli import write_config

from glmport.deepspeed_info import detect_deepspeed
from glmport.errors import ConfigError
from glmport.testing import ok, run_cli

DS_ZERO_2 = "configs/ds_zero_2.json"


@pytest.fixture
def config(tmp_path, data_dir):
    """A LoRA config whose tiny model is built only when a run starts (a dry run never builds it)."""
    return write_config(tmp_path, "lora", glmport={"init_model": "tiny-native", "model_dir": str(tmp_path / "model"),
                                                   "data_dir": str(data_dir), "eval_samples": 4, "dtype": "fp32"})


def dry_run(config, *flags, env=None, cwd=None):
    return ok(run_cli("train", config, "--nproc-per-node", "2", "--dry-run", *flags, env=env, cwd=cwd))


def node_commands(stdout: str) -> dict[int, list[str]]:
    """The command printed for each node, as the words a shell would run."""
    commands = {}
    for block in stdout.split("\n# node ")[1:]:
        header, _, text = block.partition("\n")
        commands[int(header.split()[0])] = shlex.split(text.replace("\\\n", " "))
    return commands


def torchrun_arguments(words: list[str]):
    """What torchrun makes of a printed command (``env VAR=... python -m torch.distributed.run ARGS``)."""
    from torch.distributed.run import parse_args

    start = words.index("torch.distributed.run") + 1
    env = dict(word.split("=", 1) for word in words[1:words.index("-m")] if "=" in word)
    return env, parse_args(words[start:])


def test_cpu_dry_run_prints_a_torchrun_command_that_runs_glmport_again(config, tmp_path):
    result = dry_run(config, env={"OMP_NUM_THREADS": None})  # unset: the launcher shares out the cores
    assert "2 process(es), 2 on each of 1 node(s); backend cpu, collective gloo" in result.stdout
    assert "rank 0: node 0, cpu" in result.stdout and "rank 1: node 0, cpu" in result.stdout
    env, args = torchrun_arguments(node_commands(result.stdout)[0])
    assert (args.nnodes, args.nproc_per_node, args.node_rank, args.master_addr) == ("1", "2", 0, "127.0.0.1")
    assert args.rdzv_backend == "static"  # a job controller's PET_* variables cannot change the rendezvous
    assert 0 < args.master_port < 65536  # a free port, chosen because none was given
    assert args.module and args.training_script == "glmport"
    assert args.training_script_args == ["train", str(config), "--backend", "cpu"]  # the launch flags are gone
    assert args.max_restarts == 0 and args.tee == "3"
    assert "OMP_NUM_THREADS" in env and not any(name.endswith("_VISIBLE_DEVICES") for name in env)
    assert not (tmp_path / "out").exists() and not (tmp_path / "model").exists()  # a dry run writes nothing
    yours = dry_run(config, env={"OMP_NUM_THREADS": "3"})
    assert "OMP_NUM_THREADS" not in torchrun_arguments(node_commands(yours.stdout)[0])[0]  # yours is kept


def test_cuda_dry_run_works_without_a_gpu(config):
    result = dry_run(config, "--backend", "cuda")
    assert "backend cuda, collective nccl" in result.stdout
    assert "rank 1: node 0, cuda:1" in result.stdout
    assert "backend cuda is not available here" in result.stdout
    env, _ = torchrun_arguments(node_commands(result.stdout)[0])
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"  # rank i binds device i
    # the real launch checks the backend before anything starts
    ok(run_cli("train", config, "--nproc-per-node", "2", "--backend", "cuda"), exit_code=3)


def test_mlu_dry_run_works_without_an_mlu(config):
    result = dry_run(config, "--backend", "mlu", "--devices", "2,3")
    assert "backend mlu, collective cncl" in result.stdout and "rank 1: node 0, mlu:1" in result.stdout
    env, args = torchrun_arguments(node_commands(result.stdout)[0])
    assert env["MLU_VISIBLE_DEVICES"] == "2,3" and env["PYTORCH_CNDEV_BASED_MLU_CHECK"] == "1"
    assert args.training_script_args[-2:] == ["--backend", "mlu"]


def test_emulated_mlu_dry_run_maps_cncl_onto_gloo(config):
    env = {"GLMPORT_EMULATE": "mlu", "GLMPORT_EMULATE_DEVICE_COUNT": "2"}
    result = dry_run(config, env=env)
    assert "backend mlu (emulated), collective cncl (run as gloo by the emulator)" in result.stdout
    assert "rank 1: node 0, mlu:1 (emulated on the CPU)" in result.stdout
    worker_env, _ = torchrun_arguments(node_commands(result.stdout)[0])
    assert worker_env["GLMPORT_EMULATE"] == "mlu" and worker_env["MLU_VISIBLE_DEVICES"] == "0,1"
    # the emulated host has one device unless told otherwise: two processes need two
    refused = ok(run_cli("train", config, "--nproc-per-node", "2", "--dry-run", env={"GLMPORT_EMULATE": "mlu"}),
                 exit_code=2)
    assert "only 1 mlu device(s) are visible" in refused.stderr and "GLMPORT_EMULATE_DEVICE_COUNT" in refused.stderr
    masked = ok(run_cli("train", config, "--nproc-per-node", "2", "--dry-run",
                        env={**env, "MLU_VISIBLE_DEVICES": "1"}), exit_code=2)
    assert "MLU_VISIBLE_DEVICES='1'" in masked.stderr


def test_multi_node_dry_run_prints_every_node(config):
    result = dry_run(config, "--backend", "cuda", "--nnodes", "2", "--node-rank", "1", "--master-addr", "node0",
                     "--master-port", "29400")
    commands = node_commands(result.stdout)
    assert sorted(commands) == [0, 1] and "# node 1 (this node)" in result.stdout
    for node, words in commands.items():
        _, args = torchrun_arguments(words)
        assert (args.nnodes, args.node_rank, args.master_addr, args.master_port) == ("2", node, "node0", 29400)
    assert "rank 3: node 1, cuda:1" in result.stdout and "4 process(es)" in result.stdout
    # each node runs its own `glmport train --node-rank R`: all of them must name one rendezvous, or they wait
    # for each other forever
    ids = set()
    for node in ("0", "1"):
        launched = dry_run(config, "--backend", "cuda", "--nnodes", "2", "--node-rank", node, "--master-addr", "node0",
                           "--master-port", "29400")
        ids |= {torchrun_arguments(words)[1].rdzv_id for words in node_commands(launched.stdout).values()}
    assert len(ids) == 1, ids
    default_port = dry_run(config, "--backend", "cuda", "--nnodes", "2", "--master-addr", "node0")
    assert "every node uses 29500" in default_port.stdout


@pytest.mark.parametrize("flags, message", [
    (["--nnodes", "2"], "--nnodes 2 needs the address of node 0"),
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "n0"], "--node-rank: 2 is not a node of --nnodes 2"),
    (["--devices", "0,1"], "backend cpu has no devices to choose from"),
    (["--backend", "cuda", "--devices", "0"], "names 1 device(s) for --nproc-per-node 2"),
    (["--backend", "cuda", "--devices", "0,0"], "names a device twice"),
    (["--backend", "cuda", "--devices", "a,b"], "expected device numbers"),
    (["--master-port", "70000"], "70000 is not a TCP port"),
])
def test_launch_flags_that_cannot_work_are_refused_before_anything_starts(config, tmp_path, flags, message):
    result = ok(run_cli("train", config, "--nproc-per-node", "2", "--dry-run", *flags), exit_code=2)
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_visible_devices_already_set_are_counted_from(config):
    result = dry_run(config, "--backend", "cuda", "--devices", "1,2", env={"CUDA_VISIBLE_DEVICES": "4,5,6"})
    env, _ = torchrun_arguments(node_commands(result.stdout)[0])
    assert env["CUDA_VISIBLE_DEVICES"] == "5,6"


def test_launch_flags_need_nproc_per_node(config):
    result = ok(run_cli("train", config, "--nnodes", "2", "--dry-run"), exit_code=2)
    assert "--nnodes, --dry-run describe a multi-process launch: add --nproc-per-node N" in result.stderr


def test_a_launched_process_refuses_to_launch_again(config):
    env = {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    result = ok(run_cli("train", config, "--nproc-per-node", "2", env=env), exit_code=2)
    assert "this process was started by a launcher (LOCAL_RANK=0, WORLD_SIZE=2)" in result.stderr


def test_world_size_without_a_launcher_says_how_to_launch(config, tmp_path):
    """A job controller's pod variables (WORLD_SIZE, RANK) are for a launcher to read, not a training process."""
    result = ok(run_cli("train", config, env={"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": None}), exit_code=2)
    assert "WORLD_SIZE=2 is set, but this process was not started by a launcher" in result.stderr
    assert "--nproc-per-node N --nnodes M --node-rank R" in result.stderr
    assert not (tmp_path / "out").exists()


# --- DeepSpeed: which flavour serves which device, and configs that cannot run ------------------------------

@pytest.fixture
def installed(monkeypatch):
    """Pretend exactly these distributions are installed: {name: version}."""
    import glmport.deepspeed_info as info

    def pretend(dists: dict[str, str]):
        monkeypatch.setattr(info, "_installed", dists.get)

    return pretend


def test_mlu_takes_upstream_deepspeed_or_the_vendor_fork(installed):
    mlu = ("deepspeed", "deepspeed-mlu", "deepspeed_mlu")
    installed({"deepspeed-mlu": "0.9.0"})
    fork = detect_deepspeed(mlu, "mlu", "0.15.2")
    assert (fork.usable, fork.flavour, fork.distribution, fork.accelerator) == (True, "vendor fork", "deepspeed-mlu", "mlu")
    installed({"deepspeed": "0.14.4", "deepspeed-mlu": "0.9.0"})
    old = detect_deepspeed(mlu, "mlu", "0.15.2")
    assert not old.usable and "pip install 'deepspeed>=0.15.2'" in old.note
    installed({"deepspeed": "0.19.8"})
    assert detect_deepspeed(mlu, "mlu", "0.15.2").describe() == "deepspeed 0.19.8 (upstream), DS_ACCELERATOR=mlu"


def test_a_flavour_for_another_device_names_what_to_install(installed):
    installed({"deepspeed-mlu": "0.9.0"})
    info = detect_deepspeed(("deepspeed",), "cuda", "0.9.0")
    assert not info.usable and not info.installed
    assert "deepspeed-mlu 0.9.0 is installed, a DeepSpeed flavour for another device" in info.note
    assert "pip uninstall deepspeed-mlu, then pip install 'glmport[deepspeed]'" in info.note
    installed({})
    assert detect_deepspeed(("deepspeed",), "cuda", "0.9.0").note == \
        "not installed (deepspeed); pip install 'glmport[deepspeed]'"


def test_env_shows_the_flavour_and_accelerator_a_run_would_use():
    data = json.loads(ok(run_cli("env", "--json")).stdout)["backend"]
    ds = data["deepspeed"]
    assert {"flavour", "accelerator", "distribution", "usable", "summary"} <= set(ds)
    assert ds["accelerator"] == "cpu" and data["process_group_backend"] == "gloo"
    text = ok(run_cli("env")).stdout
    assert f"deepspeed: {ds['summary']}" in text
    emulated = json.loads(ok(run_cli("env", "--json", env={"GLMPORT_EMULATE": "mlu"})).stdout)["backend"]
    assert (emulated["collective_backend"], emulated["process_group_backend"]) == ("cncl", "gloo")
    assert emulated["deepspeed"]["accelerator"] == "cpu" and not emulated["deepspeed"]["usable"]


@pytest.mark.parametrize("env", [None, {"GLMPORT_EMULATE": "mlu"}], ids=["cpu", "emulated-mlu"])
@pytest.mark.parametrize("launch", [[], ["--nproc-per-node", "2"]], ids=["one-process", "launch"])
def test_deepspeed_where_it_cannot_run_is_refused_before_anything_starts(config, tmp_path, repo_root, env, launch):
    """DeepSpeed through the Trainer needs an accelerator device: on the CPU (and on an emulated device, whose
    tensors are on the CPU) the run is refused, saying why, instead of training without DeepSpeed."""
    if env and launch:
        env = {**env, "GLMPORT_EMULATE_DEVICE_COUNT": "2"}
    result = ok(run_cli("train", config, f"training_args.deepspeed={repo_root / DS_ZERO_2}", *launch, env=env),
                exit_code=2)
    assert "DeepSpeed is configured but cannot run here" in result.stderr
    assert "training_args.deepspeed" in result.stderr
    assert "not installed" in result.stderr or "accelerator device" in result.stderr or \
        "does not run on an emulated mlu" in result.stderr
    assert not (tmp_path / "out").exists()


def test_deepspeed_dry_run_for_a_device_host_sets_its_accelerator(config, repo_root):
    result = dry_run(config, "--backend", "cuda", f"training_args.deepspeed={repo_root / DS_ZERO_2}")
    env, _ = torchrun_arguments(node_commands(result.stdout)[0])
    assert env["DS_ACCELERATOR"] == "cuda"


class _DeviceWithDeepSpeed:
    """A backend whose DeepSpeed is installed and usable (for the checks that follow), fp32 and fp16 only."""

    name = "fancy"

    def deepspeed(self):
        from glmport.deepspeed_info import DeepSpeedInfo

        return DeepSpeedInfo(True, "deepspeed", "0.19.8", "cuda", True, "DS_ACCELERATOR=cuda")

    def supported_dtypes(self):
        import torch

        return [torch.float32, torch.float16]


def _config_with(tmp_path, data_dir, deepspeed):
    from glmport.config import read_run_config

    path = write_config(tmp_path, "lora", training_args__deepspeed=deepspeed,
                        glmport={"init_model": "tiny-native", "model_dir": str(tmp_path / "model"),
                                 "data_dir": str(data_dir)})
    config, problems = read_run_config(path, [])
    assert not problems, problems
    return config


def test_deepspeed_config_problems_are_named(tmp_path, data_dir, monkeypatch):
    from glmport.train.inputs import check_deepspeed

    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "zero_optimization": {"stage": 2},\n  "bf16": {"enabled": true,}\n}\n')
    with pytest.raises(ConfigError) as raised:
        check_deepspeed(_config_with(tmp_path, data_dir, str(broken)), _DeviceWithDeepSpeed())
    assert f"{broken}:3: not valid JSON" in str(raised.value)

    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"zero_optimization": {"stage": 5}, "bf16": {"enabled": True}}))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    with pytest.raises(ConfigError) as raised:
        check_deepspeed(_config_with(tmp_path, data_dir, str(odd)), _DeviceWithDeepSpeed())
    text = str(raised.value)
    assert "zero_optimization.stage 5: DeepSpeed has stages 0, 1, 2 and 3" in text
    assert "bf16.enabled: true, but backend fancy has no bf16" in text
    assert "DS_ACCELERATOR=cpu is set, but backend fancy runs DeepSpeed's cuda accelerator" in text


@pytest.mark.parametrize("name, stage", [("ds_zero_2.json", 2), ("ds_zero_3.json", 3)])
def test_shipped_deepspeed_configs_leave_batch_and_precision_to_the_run(repo_root, name, stage):
    data = json.loads((repo_root / "configs" / name).read_text())
    assert data["zero_optimization"]["stage"] == stage
    assert data["train_micro_batch_size_per_gpu"] == "auto" and data["bf16"]["enabled"] == "auto"
    assert data["fp16"]["enabled"] == "auto"  # an MLU370 trains in fp16
    if stage == 3:  # the result is gathered into one file that loads without DeepSpeed
        assert data["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


# --- stopping together: what one rank decides from what the others report --------------------------------

class _OtherRank:
    """Stands for the rest of a 2-process run: ``any_of`` combines this rank's flags with the other's."""

    distributed = True

    def __init__(self, signalled=False, diverged=False):
        self.flags = [signalled, diverged]

    def any_of(self, flags, device):
        return [mine or theirs for mine, theirs in zip(flags, self.flags)]


def _step_end(stop, step=2):
    from types import SimpleNamespace

    from transformers import TrainerControl

    control = TrainerControl()
    stop.on_step_end(SimpleNamespace(device="cpu"), SimpleNamespace(global_step=step), control)
    return control


def test_a_rank_stops_with_the_others_and_its_own_late_signal_does_not_abort_it():
    """The launcher's SIGTERM reaches the ranks one after the other: a rank that agreed to stop because another
    rank was signalled then gets its own copy while it writes the checkpoint. That is its first signal, not a
    second one that aborts at once (which left the other rank waiting for it in a collective)."""
    import signal

    from glmport.errors import Interrupted
    from glmport.train.signals import GracefulStop

    stop = GracefulStop(_OtherRank(signalled=True))
    control = _step_end(stop)
    assert control.should_save and control.should_training_stop and stop.stopped_at == 2
    stop._on_signal(signal.SIGTERM, None)  # its own copy arrives late: noted, no abort
    with pytest.raises(Interrupted, match="stopped by a signal to another rank after step 2"):
        stop.raise_if_stopped("--resume")


def test_a_signal_during_the_agreement_waits_for_the_next_step_end():
    """What a rank sees after contributing its flag cannot change this step's decision: the other rank
    contributed 'no signal' and goes on."""
    import signal

    from glmport.train.signals import GracefulStop

    class SignalledWhileAgreeing(_OtherRank):
        def any_of(self, flags, device):
            if stop.requested is None:
                stop._on_signal(signal.SIGTERM, None)  # arrives while the first collective runs
            return super().any_of(flags, device)

    stop = GracefulStop(SignalledWhileAgreeing())
    assert not _step_end(stop, step=2).should_training_stop
    control = _step_end(stop, step=3)
    assert control.should_training_stop and stop.stopped_at == 3 and stop.reason == "SIGTERM"


def test_a_loss_that_diverged_on_another_rank_stops_this_one_at_the_same_step():
    from types import SimpleNamespace

    from glmport.train.signals import GracefulStop

    trainer = SimpleNamespace(first_nonfinite_step=None)
    control = _step_end(GracefulStop(_OtherRank(diverged=True), trainer), step=5)
    assert control.should_training_stop and not control.should_save
    assert trainer.first_nonfinite_step == 5  # so this rank saves nothing of it and raises like the other
