"""The application: the Ray jobs and the ``vlp`` command, built on the library ``vlp``.

- ``cli``: the ``vlp`` command (the console script), one subcommand per job;
- curation on Ray Data: ``image_text`` and ``video_text`` (the processors), ``curation_job`` (the
  job they share: reader, processor pool, dedup actors, sink), ``sources`` (the readers of manifests,
  folders and tars), ``shard_sink`` (atomic, resumable shard commits), ``progress``;
- training on Ray Train: ``train_job`` (the launcher of ``vlp train``) and ``train_data`` (the Ray
  Data input pipeline it streams from); the loop itself is the library's ``vlp.train.loop``;
- ``ray_runtime``: the embedded local Ray, or a cluster's address;
- operations: ``submit`` (``vlp submit``, ``vlp jobs``) and ``cluster_config`` (offline checks of
  cluster launcher configs and job specs, ``python -m pipelines.cluster_config FILE``).

Imports point one way: this package imports ``vlp``, never the reverse (tests/test_architecture.py).
A new Ray Data job is one module here exposing a function that builds it from a typed config.
"""
