"""Cluster jobs: ``glmport job render`` writes a Kubeflow PyTorchJob manifest or a Slurm ``sbatch`` script that
runs the same ``glmport train`` on every node.

* :mod:`glmport.job.request`: the flags, checked;
* :mod:`glmport.job.plan`: the config read and checked with them, the paths and the command every node runs;
* :mod:`glmport.job.pytorchjob` and :mod:`glmport.job.slurm`: the two renderers.
"""

from __future__ import annotations

from glmport.job.plan import JobPlan, plan_job
from glmport.job.request import JobRequest, Toleration, Volume

__all__ = ["JobPlan", "JobRequest", "Toleration", "Volume", "plan_job", "render_job"]


def render_job(request: JobRequest, manager, problems=None) -> tuple[str, JobPlan]:
    """The job file's text and the plan it came from; raises :class:`glmport.errors.ConfigError` with every
    problem of the flags (and ``problems`` found while parsing them) and the config."""
    from glmport.job import pytorchjob, slurm

    plan = plan_job(request, manager, problems)
    text = pytorchjob.render(plan) if request.kind == "pytorchjob" else slurm.render(plan)
    return text, plan
