"""Running ``vlp`` commands on a Ray cluster as Ray jobs.

``submit.py`` owns ``vlp submit`` (package the working directory, submit, follow the logs, exit with
the job's outcome) and ``vlp jobs`` (status, logs, stop, list). Deployment manifests (KubeRay
RayCluster/RayJob) live in ``infra/``, not here: this package only talks to a cluster's job API.
"""

from vlp.jobs.submit import ClusterConfig, JobConfig, SubmitError

__all__ = ["ClusterConfig", "JobConfig", "SubmitError"]
