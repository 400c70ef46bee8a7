"""A backend shipped as its own distribution: built and installed in the test, found by entry point,
listed by `glmport backends`, and held to the same contract as the builtins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from glmport.testing import ok, run_cli

PLUGIN_MODULE = '''
"""A toy backend: CPU tensors, but without 64-bit kernels, like a new accelerator emulated on a CPU."""
import torch
from glmport import hookimpl
from glmport.backend import Availability, Backend, SixtyFourBitPolicy
from glmport.backends._memory import host_memory_stats, reset_host_peak
from glmport.testing.emulation import cpu_int32_kernels


class FancyBackend(Backend):
    name = "fancy"
    description = "toy accelerator from a third-party distribution"
    device_type = "cpu"
    auto_priority = -10
    collective_backend = "gloo"
    visible_devices_env = "FANCY_VISIBLE_DEVICES"
    deepspeed_accelerator = "cpu"

    def availability(self):
        return Availability(True, "fancy is always here")

    def device_count(self):
        return 2

    def memory_stats(self):
        return host_memory_stats()

    def reset_peak_memory(self):
        reset_host_peak()

    def sixty_four_bit_policy(self):
        return SixtyFourBitPolicy({torch.int64: torch.int32, torch.float64: torch.float32})

    def compute_context(self):
        return cpu_int32_kernels()

    def training_arguments(self):
        return {"use_cpu": True}


@hookimpl
def glmport_register_backends(registry):
    registry.add(FancyBackend())


@hookimpl
def glmport_env_report(backend):
    return {"fancy-firmware": "1.2.3"}
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "glmport-fancy"
version = "0.3.0"

[project.entry-points.glmport]
fancy = "glmport_fancy"
'''

CONTRACT_TEST = '''
from glmport.testing import BackendContract


class TestFancy(BackendContract):
    backend_name = "fancy"
'''


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("glmport-fancy-src")
    (source / "glmport_fancy.py").write_text(PLUGIN_MODULE)
    (source / "pyproject.toml").write_text(PYPROJECT)
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(source)],
        check=True, capture_output=True, text=True,
    )
    assert list(target.glob("glmport_fancy-0.3.0.dist-info"))
    return target


def _env_with(site: Path, **extra) -> dict:
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return env


@pytest.fixture
def on_sys_path(installed_plugin, monkeypatch):
    """The distribution on ``sys.path`` of this process, as if installed; its module forgotten afterwards."""
    monkeypatch.syspath_prepend(str(installed_plugin))
    yield installed_plugin
    sys.modules.pop("glmport_fancy", None)


def test_installed_backend_appears_in_glmport_backends(installed_plugin):
    """In a fresh interpreter, the way users run it: the entry point is found from the installed metadata."""
    out = ok(run_cli("backends", "--json", env={"PYTHONPATH": _env_with(installed_plugin)["PYTHONPATH"]},
                     in_process=False))
    data = json.loads(out.stdout)
    fancy = next(b for b in data["backends"] if b["name"] == "fancy")
    assert fancy["available"] and fancy["device_count"] == 2 and fancy["plugin"] == "fancy"
    assert data["auto_order"][-1] == "fancy", "priority -10 sorts after cpu"


def test_installed_plugin_is_listed_with_its_distribution(on_sys_path):
    out = ok(run_cli("plugins", "--json"))
    plugins = {p["name"]: p for p in json.loads(out.stdout)["plugins"]}
    assert plugins["fancy"]["origin"] == "entry point"
    assert plugins["fancy"]["distribution"] == "glmport-fancy" and plugins["fancy"]["version"] == "0.3.0"
    assert plugins["fancy"]["hooks"] == ["glmport_env_report", "glmport_register_backends"]


def test_env_report_hook_reaches_glmport_env(on_sys_path):
    out = ok(run_cli("--backend", "fancy", "env", "--json"))
    data = json.loads(out.stdout)
    assert data["backend"]["selected"] == "fancy"
    assert data["plugins"]["fancy"] == {"fancy-firmware": "1.2.3"}


def test_plugin_can_be_disabled_and_autoload_turned_off(on_sys_path):
    for extra_args, extra_env in ((["-p", "no:fancy"], {}), ([], {"GLMPORT_DISABLE_PLUGINS": "fancy"}),
                                  ([], {"GLMPORT_DISABLE_PLUGIN_AUTOLOAD": "1"}), (["--disable-plugin-autoload"], {})):
        out = ok(run_cli(*extra_args, "backends", "--json", env=extra_env))
        names = [b["name"] for b in json.loads(out.stdout)["backends"]]
        assert "fancy" not in names and "cpu" in names, (extra_args, extra_env)
    # with autoload off, -p loads it by module name
    out = ok(run_cli("--disable-plugin-autoload", "-p", "glmport_fancy", "backends", "--json"))
    assert "fancy" in [b["name"] for b in json.loads(out.stdout)["backends"]]


def test_installed_backend_passes_the_contract(installed_plugin, tmp_path):
    (tmp_path / "test_fancy_contract.py").write_text(textwrap.dedent(CONTRACT_TEST))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_fancy_contract.py")],
        env=_env_with(installed_plugin), capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # every contract test ran (the two 64-bit ones too: fancy lacks 64-bit kernels) except the
    # half-precision autocast test, skipped because fancy trains in fp32 only
    assert "13 passed, 1 skipped" in result.stdout, result.stdout


@pytest.mark.slow
def test_plugin_backend_without_64bit_gets_the_int32_patches_and_trains_clean(on_sys_path, tmp_path):
    """Patches are chosen by capability: fancy is nobody's builtin, but it lacks 64-bit kernels, so a
    remote-code ChatGLM3 model gets the int32 set (and no-torchscript) and trains with the guard clean."""
    import yaml

    from glmport.tiny.synthetic import make_records, write_jsonl

    ok(run_cli("init-model", "tiny-remote", tmp_path / "model"))
    write_jsonl(tmp_path / "train.jsonl", make_records(16, seed=1))
    config = tmp_path / "fancy.yaml"
    config.write_text(yaml.safe_dump({
        "data_config": {"train_file": "train.jsonl"},
        "max_input_length": 32, "max_output_length": 16,
        "training_args": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 4,
                          "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no", "report_to": "none"},
        "peft_config": {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 16},
        "glmport": {"guard_64bit": "on", "dtype": "fp32", "plot": False},
    }))
    ok(run_cli("train", tmp_path, tmp_path / "model", config, "--backend", "fancy"))
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["backend"] == "fancy" and summary["steps"] == 2
    assert "int32/int32-positions" in summary["patches"] and "no-torchscript/torchscript-off" in summary["patches"]
    assert "accelerator/" not in summary["patches"]  # fancy's tensors live on the host CPU
    assert summary["guard_64bit"]["mode"] == "error" and summary["guard_64bit"]["ops_checked"] > 1000
    assert summary["guard_64bit"]["leaks"] == []
