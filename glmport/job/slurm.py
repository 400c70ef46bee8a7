"""An ``sbatch`` script that runs ``glmport train`` on N nodes of a Slurm cluster.

``srun`` starts one task per node, and each task runs glmport's launcher for that node's processes
(``--nproc-per-node``), as torchrun's own Slurm recipe does. Who is who comes from Slurm: the master is the
first host of ``SLURM_JOB_NODELIST`` (expanded by ``scontrol show hostnames``), and each task's node rank is
its ``SLURM_NODEID``, which srun sets per task; so the rank is read inside the task, not in the batch
script (which runs on the first node only).

Stopping and continuing: ``--signal=TERM@GRACE`` sends SIGTERM to the tasks GRACE seconds before the time
limit; glmport then finishes its step, writes a complete checkpoint and exits 130, and the script requeues
the job (``scontrol requeue``), which resumes from that checkpoint (``--resume yes``). A preempted job
(``PreemptMode=REQUEUE``) and ``#SBATCH --requeue`` after a node failure resume the same way. ``scancel``
signals the batch script itself, which stops at once, so a cancelled job is not requeued.

With ``--image`` the tasks run in that container through the pyxis plugin (``srun --container-image``),
with the model, data, output and config mounted where the PyTorchJob's pods have them.
"""

from __future__ import annotations

import shlex

from glmport import __version__
from glmport.job.plan import JobPlan, one_line

INTERRUPTED = 130  # glmport's exit status after a SIGTERM: a complete checkpoint was written


def render(plan: JobPlan) -> str:
    request = plan.request
    sbatch = [
        f"--job-name={plan.name}",
        f"--nodes={request.nnodes}",
        "--ntasks-per-node=1",  # one glmport launcher per node; it starts the node's processes
        f"--signal=TERM@{request.grace_period}" if request.grace_period else None,
        "--requeue",
        "--open-mode=append",  # a requeued job adds to its log instead of replacing it
        f"--output={plan.name}-%j.out",
    ]
    if plan.accelerator_resource:
        sbatch.append(f"--gres={plan.accelerator_resource}:{request.nproc_per_node}")
    if request.cpus:
        sbatch.append(f"--cpus-per-task={request.cpus}")
    if request.memory:
        sbatch.append(f"--mem={_slurm_memory(request.memory)}")
    if request.queue:
        sbatch.append(f"--partition={request.queue}")
    if request.priority:
        sbatch.append(f"--qos={request.priority}")
    if request.time_limit:
        sbatch.append(f"--time={request.time_limit}")

    srun = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if request.image:
        mounts = ",".join(f"{m.source}:{m.target}" + (":ro" if m.read_only else "") for m in plan.mounts)
        srun += [f"--container-image={request.image}", f"--container-mounts={mounts}"]
    env = [f"export {key}={shlex.quote(value)}" for key, value in request.env.items()]
    train = [shlex.quote(arg) for arg in plan.train_command(master_addr="MASTER_ADDR", node_rank=None)]
    train[train.index("--master-addr") + 1] = '"$master_addr"'

    lines = [
        "#!/bin/bash",
        f"# Rendered by `glmport job render` (glmport {__version__}) from {one_line(plan.config.path)}, backend {plan.backend}.",
        f"# {request.nnodes} node(s) x {request.nproc_per_node} process(es)"
        + (f" on {plan.accelerator_resource}" if plan.accelerator_resource else " on CPU")
        + (f", in the container {request.image} (pyxis)" if request.image else "")
        + ". Submit: sbatch FILE",
        *[f"#SBATCH {option}" for option in sbatch if option],
        *[f"# NOTE: {one_line(warning)}" for warning in plan.warnings],
        "set -euo pipefail",
        "",
        *env,
        "# The first node of the allocation hosts the rendezvous.",
        'nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        'master_addr=${nodes%%$\'\\n\'*}',
        "",
        "train=(",
        *[f"    {line}" for line in _argument_lines(train)],
        ")",
        *([f"mkdir -p {shlex.quote(plan.host_output_dir)}  # mounted at {plan.output_dir}"] if request.image else []),
        "",
        "# Each task appends its own node rank: SLURM_NODEID is set by srun, per task (hence the single quotes).",
        "status=0",
        "# shellcheck disable=SC2016",
        f"{' '.join(shlex.quote(a) for a in srun)} \\",
        '    bash -c \'exec "$@" --node-rank "$SLURM_NODEID"\' glmport-node "${train[@]}" || status=$?',
        f"if [ \"$status\" -eq {INTERRUPTED} ]; then",
        "    # Stopped by the time-limit signal after a complete checkpoint: queue again, to resume from it.",
        '    scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"


def _argument_lines(arguments: list[str]) -> list[str]:
    """The command's words as the eye reads them: the positional ones on the first line, then an option
    with its value per line, then the overrides."""
    lines, current = [], []
    for word in arguments:
        if word.startswith("--") or "=" in word:
            lines.append(" ".join(current))
            current = []
        current.append(word)
    return [line for line in lines + [" ".join(current)] if line]


def _slurm_memory(quantity: str) -> str:
    """Kubernetes-style sizes (16Gi) to Slurm's (16G, binary units)."""
    for suffix, slurm in (("Ki", "K"), ("Mi", "M"), ("Gi", "G"), ("Ti", "T")):
        if quantity.endswith(suffix):
            return quantity[: -len(suffix)] + slurm
    return quantity
