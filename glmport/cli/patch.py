"""``glmport patch``: which patches a model folder gets, and an overlay folder with them applied.

    glmport patch list [--json]
    glmport patch revisions [--family F] [--json]
    glmport patch plan MODEL_DIR --backend B --mode infer|train [--json] [--allow-unverified-patches]
    glmport patch materialize MODEL_DIR OUT --backend B --mode infer|train

``--backend`` names the backend to plan for; it need not be available on this machine.
"""

from __future__ import annotations

from pathlib import Path

from glmport.cli._output import print_json, table
from glmport.errors import BackendUnavailable, PatchError


def add_parser(subparsers, common) -> None:
    p = subparsers.add_parser("patch", parents=[common], help="plan, list or materialize modeling_chatglm.py patch sets")
    commands = p.add_subparsers(dest="patch_command", metavar="SUBCOMMAND", required=True)

    listing = commands.add_parser("list", parents=[common], help="every registered patch set and its patches")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_list, checks_backend=False)

    known = commands.add_parser("revisions", parents=[common],
                                help="the upstream remote-code revisions glmport knows (patches/manifest.json)")
    known.add_argument("--family", help="only this family (chatglm3, glm4, ...)")
    known.add_argument("--json", action="store_true")
    known.set_defaults(handler=cmd_revisions, checks_backend=False)

    for name, helptext in (("plan", "the patches a folder gets for a backend and mode, and why (or what is refused)"),
                           ("materialize", "write an overlay folder (links to the weights, patched code)")):
        sub = commands.add_parser(name, parents=[common], help=helptext)
        sub.add_argument("model_dir", type=Path)
        if name == "materialize":
            sub.add_argument("out", type=Path)
        sub.add_argument("--mode", choices=["infer", "train"], required=True)
        sub.add_argument("--allow-unverified-patches", action="store_true",
                         help="patch code whose revision is not in the manifest")
        if name == "plan":
            sub.add_argument("--json", action="store_true")
        sub.set_defaults(handler=cmd_plan if name == "plan" else cmd_materialize, checks_backend=False)


# A refused plan is bad input (an unknown revision, a missing target): the exit status of a GlmportError.
REFUSED = 2


def _backend(args, manager):
    name = args.backend
    if name in (None, "", "auto"):
        raise PatchError("--backend is required: plans are made for a named backend (cpu, cuda, mlu, ...)")
    backend = manager.backends.get(name)
    if backend is None:
        raise BackendUnavailable(f"--backend {name!r}: no such backend. Known backends: {', '.join(manager.backends.names())}")
    return backend


def _plan(args, manager):
    from glmport.modeling import inspect_model_dir
    from glmport.patching.session import load_modules, make_plan

    info = inspect_model_dir(args.model_dir.resolve())
    backend = _backend(args, manager)
    registry = manager.patch_sets
    plan = make_plan(info, backend, args.mode, registry, allow_unverified=args.allow_unverified_patches)
    if not plan.problems:  # preflight: import the code and resolve every target
        try:
            modules, _ = load_modules(info)
        except PatchError as exc:
            from glmport.errors import Problem

            plan.problems.append(Problem(str(info.path), str(exc)))
        else:
            plan = make_plan(info, backend, args.mode, registry, modules=modules,
                             allow_unverified=args.allow_unverified_patches)
    return plan


def cmd_plan(args, manager) -> int:
    plan = _plan(args, manager)
    if args.json:
        print_json(plan.as_dict())
        return REFUSED if plan.problems else 0
    print(f"{plan.model_dir}: {plan.kind} {plan.family}, backend {plan.backend}, mode {plan.mode}")
    for key, f in plan.files.items():
        rev = f.revision or "UNKNOWN REVISION"
        extra = f" (glmport test module imitating {f.imitates})" if f.imitates else ""
        detail = f" [{f.detail}]" if f.detail and not f.revision else ""
        print(f"  {key:<14} {rev}{extra}{detail}")
    print()
    rows = [[e.set_name, e.patch.id, e.status, e.reason] for e in plan.entries]
    print(table(["SET", "PATCH", "STATUS", "WHY"], rows) if rows else "  no patches registered for this family")
    if plan.problems:
        print("\nREFUSED:")
        for problem in plan.problems:
            print(f"  - {problem}")
        return REFUSED
    print(f"\n{len(plan.to_apply)} patch(es) will be applied.")
    return 0


def cmd_materialize(args, manager) -> int:
    from glmport.patching.overlay import materialize

    plan = _plan(args, manager)
    out = materialize(plan, args.model_dir, args.out)
    print(f"wrote overlay {out} ({len(plan.to_apply)} patches for {plan.backend}/{plan.mode}); "
          "load it by path with trust_remote_code=True (glmport must be importable there)")
    return 0


def cmd_list(args, manager) -> int:
    from glmport.patching.session import describe_patch_set

    registry = manager.patch_sets
    if args.json:
        print_json([{"set": s.name, "description": s.description, "plugin": registry.origin(s.name),
                     "patches": describe_patch_set(s)} for s in registry])
        return 0
    for patch_set in registry:
        print(f"{patch_set.name}: {patch_set.description} (from plugin {registry.origin(patch_set.name)})")
        rows = [[p.family, p.id, ",".join(p.backends) if isinstance(p.backends, tuple) else p.backends,
                 ",".join(p.requires) or "-", ",".join(p.modes), p.why] for p in patch_set.patches]
        print(table(["FAMILY", "PATCH", "BACKENDS", "REQUIRES", "MODES", "WHY"], rows))
        print()
    return 0


def cmd_revisions(args, manager) -> int:
    """Every revision in the manifest, oldest first per family, with the files it is recognized by. A folder
    whose remote-code files are not among these is refused unless --allow-unverified-patches is given."""
    from glmport.patching.manifest import REMOTE_FILES, load_manifest

    manifest = load_manifest()
    revisions = manifest["revisions"]
    if args.family and args.family not in {meta["family"] for meta in revisions.values()}:
        known = sorted({meta["family"] for meta in revisions.values()})
        raise PatchError(f"--family {args.family!r}: no revision of that family in the manifest; "
                         f"families: {', '.join(known)}")
    files: dict[str, dict[str, list[dict]]] = {name: {} for name in revisions}
    for file_name, entries in manifest["files"].items():
        key = next(k for k, v in REMOTE_FILES.items() if v == file_name)
        for digest, entry in entries.items():
            files[entry["revision"]].setdefault(key, []).append(
                {"sha256": digest, "hash": entry["hash"], "source": entry["source"]})
    chosen = sorted((name for name, meta in revisions.items() if args.family in (None, meta["family"])),
                    key=lambda name: (revisions[name]["family"], revisions[name]["date"], name))
    if args.json:
        print_json([{"revision": name, **revisions[name], "files": files[name]} for name in chosen])
        return 0
    rows = [[name, revisions[name]["family"], revisions[name]["date"],
             ",".join(key for key in REMOTE_FILES if key in files[name]), revisions[name]["note"]] for name in chosen]
    print(table(["REVISION", "FAMILY", "DATE", "FILES", "NOTE"], rows))
    print("\nA file the manifest lists under an older revision (a file two revisions share) is not repeated "
          "under the newer one.")
    return 0
