"""``glmport job render``: a Kubeflow PyTorchJob manifest or a Slurm ``sbatch`` script that runs ``glmport train``
on every node of a cluster.

    glmport job render CONFIG --backend cuda --nnodes 2 --nproc-per-node 8 --image REGISTRY/glmport:cuda \\
        --model-pvc models:chatglm3-6b --data-pvc datasets:AdvertiseGen --output-pvc runs -o job.yaml
    glmport job render CONFIG --kind slurm --backend cuda --nnodes 2 --nproc-per-node 8 -o job.sbatch

KEY=VALUE overrides after CONFIG go to every node's ``glmport train``, as they would on one machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from glmport.errors import ConfigError


def add_parser(subparsers, common) -> None:
    job = subparsers.add_parser("job", parents=[common], help="render a cluster job (Kubeflow PyTorchJob, Slurm)")
    commands = job.add_subparsers(dest="job_command", metavar="SUBCOMMAND", required=True)
    p = commands.add_parser(
        "render", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="write a PyTorchJob manifest or an sbatch script running glmport train on every node",
        description=__doc__.split("\n", 3)[3],
    )
    p.add_argument("arguments", nargs="+", metavar="ARG", help="CONFIG, then KEY=VALUE overrides")
    p.add_argument("--kind", choices=["pytorchjob", "slurm"], default="pytorchjob",
                   help="pytorchjob (Kubeflow training-operator, kubeflow.org/v1; default) or slurm (sbatch script)")
    p.add_argument("--nnodes", type=int, default=1, metavar="N", help="nodes (pods) in the job (default 1)")
    p.add_argument("--nproc-per-node", type=int, default=1, metavar="K",
                   help="processes per node, one per device; also the devices each node asks for (default 1)")
    p.add_argument("--image", metavar="IMAGE", help="container image (required for pytorchjob; with slurm, runs "
                   "the tasks in it through pyxis)")
    p.add_argument("--name", help="job name (default: glmport-<config file name>); the run writes to OUTPUT/NAME")
    p.add_argument("-o", "--output-file", metavar="FILE", help="write here (atomically) instead of to stdout")

    where = p.add_argument_group("folders (a PersistentVolumeClaim, optionally CLAIM:FOLDER inside it, or a path "
                                 "on the nodes; with slurm, --*-dir default to the config's own folders)")
    for what, mode in (("model", "read-only"), ("data", "read-only"), ("output", "read-write")):
        group = where.add_mutually_exclusive_group()
        group.add_argument(f"--{what}-pvc", metavar="CLAIM[:FOLDER]", help=f"the {what} folder's claim ({mode})")
        group.add_argument(f"--{what}-dir", metavar="PATH", help=f"the {what} folder on the nodes ({mode})")
    where.add_argument("--shared-host-path", action="store_true",
                       help="--output-dir is one shared file system mounted on every node (multi-node hostPath)")

    scheduling = p.add_argument_group("scheduling")
    scheduling.add_argument("--queue", help="pytorchjob: the Kueue LocalQueue or Volcano queue; slurm: the partition")
    scheduling.add_argument("--scheduler", choices=["kueue", "volcano"], default="kueue",
                            help="who reads --queue: kueue (the kueue.x-k8s.io/queue-name label; default) or volcano "
                                 "(runPolicy.schedulingPolicy.queue, with gang scheduling)")
    scheduling.add_argument("--priority", help="pytorchjob: a PriorityClass; slurm: a QOS")
    scheduling.add_argument("--namespace", help="pytorchjob: the namespace of the job and its ConfigMap")
    scheduling.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE",
                            help="pytorchjob: run only on nodes with this label (repeatable)")
    scheduling.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE][:EFFECT]",
                            help="pytorchjob: tolerate this taint (repeatable)")
    scheduling.add_argument("--accelerator-resource", metavar="NAME",
                            help="what a node asks for per device (default: nvidia.com/gpu or cambricon.com/mlu on "
                                 "Kubernetes; GRES gpu or mlu on Slurm)")
    scheduling.add_argument("--cpus", type=int, metavar="N", help="CPU cores per node")
    scheduling.add_argument("--memory", metavar="SIZE", help="memory per node, e.g. 256Gi")
    scheduling.add_argument("--time", dest="time_limit", metavar="LIMIT", help="slurm: time limit, e.g. 1-00:00:00")

    failures = p.add_argument_group("restarts")
    failures.add_argument("--restart-policy", choices=["OnFailure", "ExitCode"], default="OnFailure",
                          help="pytorchjob: OnFailure (default) restarts a failed pod whatever its exit status; "
                               "ExitCode only after a signal (preemption, the OOM killer), not after bad input")
    failures.add_argument("--max-restarts", type=int, default=3, metavar="N",
                          help="pytorchjob: restarts before the job is failed (runPolicy.backoffLimit, default 3)")
    failures.add_argument("--grace-period", type=int, default=300, metavar="SECONDS",
                          help="time between SIGTERM and the kill, for a last checkpoint (default 300)")

    run = p.add_argument_group("runtime")
    run.add_argument("--master-port", type=int, metavar="PORT",
                     help="rendezvous port on the first node (default 23456 for pytorchjob, 29500 for slurm)")
    run.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                     help="environment variable for every node (repeatable)")
    run.add_argument("--shm-size", metavar="SIZE", help="pytorchjob: /dev/shm per pod (default 16Gi)")
    # The job's backend is the cluster's, not this machine's: it is checked by name only.
    p.set_defaults(handler=cmd_render, checks_backend=False)


def build_request(args):
    from glmport.job import JobRequest
    from glmport.job.request import parse_key_values, parse_toleration, parse_volume

    positional = [a for a in args.arguments if "=" not in a]
    if len(positional) != 1:
        raise ConfigError(f"glmport job render takes one CONFIG (plus KEY=VALUE overrides); got "
                          f"{len(positional)} positional arguments: {' '.join(positional) or '(none)'}")
    problems = []
    volumes = {}
    for what in ("model", "data", "output"):
        for form in ("pvc", "dir"):
            value = getattr(args, f"{what}_{form}")
            if value is not None:
                volumes[what] = parse_volume(value, f"--{what}-{form}", problems)
    request = JobRequest(
        config=Path(positional[0]), overrides=[a for a in args.arguments if "=" in a], kind=args.kind,
        backend=args.backend, nnodes=args.nnodes, nproc_per_node=args.nproc_per_node, image=args.image,
        name=args.name, namespace=args.namespace, queue=args.queue, scheduler=args.scheduler,
        priority=args.priority, shared_host_path=args.shared_host_path, master_port=args.master_port,
        accelerator_resource=args.accelerator_resource,
        node_selector=parse_key_values(args.node_selector, "--node-selector", problems),
        tolerations=[t for t in (parse_toleration(t, problems) for t in args.toleration) if t],
        env=parse_key_values(args.env, "--env", problems, env=True),
        restart_policy=args.restart_policy, max_restarts=args.max_restarts, grace_period=args.grace_period,
        shm_size=args.shm_size, cpus=args.cpus, memory=args.memory, time_limit=args.time_limit, **volumes,
    )
    return request, problems


def cmd_render(args, manager) -> int:
    from glmport.data.loader import write_text_atomically
    from glmport.job import render_job

    request, problems = build_request(args)
    text, plan = render_job(request, manager, problems)
    for warning in plan.warnings:
        print(f"glmport: warning: {warning}", file=sys.stderr)
    if args.output_file:
        target = write_text_atomically(Path(args.output_file), text)
        submit = "kubectl apply -f" if request.kind == "pytorchjob" else "sbatch"
        print(f"wrote {target} ({request.kind}, {request.nnodes} node(s) x {request.nproc_per_node}); "
              f"submit with: {submit} {target}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
