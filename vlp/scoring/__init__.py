"""Learned curation: scores and embeddings of curated pairs from a dual encoder, kept beside the
shards as sidecars, never rewriting them.

- ``config``: ``ScoreConfig``, the settings of ``vlp score``;
- ``sidecar``: where scores live (``<shards>/_scores/<name>/``), their schema, their run manifest
  (model, preprocessing, settings, status) and score statistics;
- ``batches``: the pure per-batch steps the Ray Data job wires together: shard rows -> model inputs
  (CPU), model inputs -> embeddings and ``clip_score`` (the encoder, CPU or GPU).

The job itself (reading shards, the encoder actor pool, committing sidecars) is the application's
``pipelines/scoring_job.py``. A new score (e.g. an aesthetic head over the image embedding) is a new
column computed in ``batches`` and declared in ``sidecar``.
"""
