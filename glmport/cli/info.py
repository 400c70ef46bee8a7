"""``glmport backends``, ``glmport env`` and ``glmport plugins``: what this machine can do."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

from glmport import __version__
from glmport.backend import select_backend
from glmport.cli._output import print_json, table
from glmport.errors import BackendUnavailable

PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "pluggy")

# Variables that matter to every backend; each backend adds its own (visible-devices mask, probes).
GENERAL_ENV = (
    "HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_OFFLINE", "DS_ACCELERATOR", "OMP_NUM_THREADS",
    "TORCH_DEVICE_BACKEND_AUTOLOAD", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GLMPORT_UPSTREAM_DIR",
)


def add_parser(subparsers, common) -> None:
    p = subparsers.add_parser("backends", parents=[common], help="list device backends, availability and why")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_backends)

    p = subparsers.add_parser("env", parents=[common], help="versions, the selected backend and relevant environment")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_env)

    p = subparsers.add_parser("plugins", parents=[common], help="list registered plugins and where they come from")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_plugins)


def _auto_selection(manager, requested):
    try:
        return select_backend(manager.backends, requested), None
    except BackendUnavailable as exc:
        return None, str(exc)


def cmd_backends(args, manager) -> int:
    registry = manager.backends
    rows = [dict(b.describe(), plugin=registry.origin(b.name)) for b in registry]
    selection, error = _auto_selection(manager, args.backend)
    if args.json:
        print_json({
            "auto_order": registry.names(),
            "selected": selection.backend.name if selection else None,
            "selected_how": selection.how if selection else error,
            "backends": rows,
        })
        return 0
    print(f"Backends, in the order `--backend auto` tries them: {' > '.join(registry.names())}\n")
    body = []
    for r in rows:
        ds = r["deepspeed"]
        ds_text = f"{ds['distribution']} {ds['version']}" if ds["installed"] else "not installed"
        if ds["installed"] and not ds["usable"]:
            ds_text += " (cannot run, see below)"
        body.append([
            r["name"], ("yes (emulated)" if r["emulated"] else "yes") if r["available"] else "no",
            r["device_count"], r["collective_backend"], r["visible_devices_env"], ds_text, r["plugin"],
        ])
    print(table(["NAME", "AVAILABLE", "DEVICES", "COLLECTIVE", "VISIBLE-DEVICES VAR", "DEEPSPEED", "PLUGIN"], body))
    print()
    for r in rows:
        print(f"  {r['name']}: {r['reason']}")
        if not r["available"] and r["install_hint"]:
            print(f"      -> {r['install_hint']}")
        if r["deepspeed"]["installed"] and not r["deepspeed"]["usable"]:
            print(f"      DeepSpeed: {r['deepspeed']['note']}")
    print()
    print(f"Selected: {selection.backend.name} ({selection.how})" if selection else f"Selected: none ({error})")
    return 0


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def collect_env(manager, requested) -> dict:
    registry = manager.backends
    selection, error = _auto_selection(manager, requested)
    backend = selection.backend if selection else None
    versions = {"glmport": __version__, "python": platform.python_version()}
    versions.update({name: _version(name) for name in PACKAGES})
    ds = (backend or registry.get("cpu") or next(iter(registry))).deepspeed()
    versions["deepspeed"] = f"{ds.version} ({ds.distribution}, {ds.flavour})" if ds.installed else None

    names = set(GENERAL_ENV) | {k for k in os.environ if k.startswith("GLMPORT_")}
    for b in registry:
        if b.visible_devices_env:
            names.add(b.visible_devices_env)
    if backend is not None:
        names.update(backend.environment())
    env = {k: os.environ.get(k) for k in sorted(names)}
    return {
        "versions": versions,
        "platform": {"system": platform.platform(), "machine": platform.machine(), "executable": sys.executable},
        "backend": {
            "selected": backend.name if backend else None,
            "why": selection.how if selection else error,
            "emulated": backend.emulated if backend else False,
            "device_count": backend.device_count() if backend else 0,
            "collective_backend": backend.collective_backend if backend else None,
            # what a multi-process run initializes (gloo for an emulated device)
            "process_group_backend": backend.process_group_backend() if backend else None,
            "deepspeed": {**ds.as_dict(), "summary": ds.describe()},
        },
        "environment": env,
        "plugins": manager.env_reports(backend),
    }


def cmd_env(args, manager) -> int:
    data = collect_env(manager, args.backend)
    if args.json:
        print_json(data)
        return 0
    print("Versions")
    print(table(["PACKAGE", "VERSION"], [[k, v or "not installed"] for k, v in data["versions"].items()]))
    b = data["backend"]
    print("\nBackend")
    print(f"  selected: {b['selected'] or 'none'}{' (emulated)' if b['emulated'] else ''}")
    print(f"  why:      {b['why']}")
    if b["selected"]:
        collective = b["collective_backend"]
        if b["process_group_backend"] != collective:
            collective += f" (run as {b['process_group_backend']} by the emulator)"
        print(f"  devices:  {b['device_count']}    collective: {collective}")
    print(f"  deepspeed: {b['deepspeed']['summary']}")
    print("\nEnvironment")
    print(table(["VARIABLE", "VALUE"], [[k, v if v is not None else "(unset)"] for k, v in data["environment"].items()]))
    for plugin, report in data["plugins"].items():
        print(f"\nFrom plugin {plugin}")
        print(table(["NAME", "VALUE"], [[k, v] for k, v in report.items()]))
    return 0


def cmd_plugins(args, manager) -> int:
    infos = list(manager.info.values())
    if args.json:
        print_json({
            "autoload": manager.autoload,
            "disabled": sorted(manager.disabled),
            "plugins": [i.as_dict() for i in infos],
        })
        return 0
    rows = [[i.name, i.origin, i.module, f"{i.distribution} {i.version}" if i.distribution else None, ", ".join(i.hooks)]
            for i in infos]
    print(table(["NAME", "ORIGIN", "MODULE", "DISTRIBUTION", "HOOKS"], rows))
    print(f"\nentry-point autoload: {'on' if manager.autoload else 'off'}"
          + (f"; disabled: {', '.join(sorted(manager.disabled))}" if manager.disabled else ""))
    return 0
