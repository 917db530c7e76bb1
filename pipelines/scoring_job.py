"""``vlp score``: a dual encoder's scores (and optionally embeddings) of curated pairs, on Ray Data.

The job reads a complete shard folder (``ShardFolder``), and for every shard not scored yet:

1. row ranges of each shard are read (``image`` or clip ``frames``, and ``caption``) in batches and
   turned into the model's inputs with the model's own preprocessing and tokenizer
   (``vlp.scoring.batches.prepare_score_batch``);
2. an actor pool of encoders (one GPU each where the cluster has GPUs, bf16 there; CPU actors
   otherwise) computes the embeddings and ``clip_score`` (``score_batch``);
3. a sink commits what it receives as part files per shard (``_scores/NAME/_parts/<shard>/``, each
   written atomically);

then the driver turns each shard's parts into its sidecar (``_scores/NAME/<shard name>``, row for row
with the shard), written once and atomically, and writes the statistics and the histogram. The layout
is ``vlp/scoring/sidecar.py``'s.

The unit of work is a read: up to ``rows_per_read`` rows of a shard. Where the cluster has GPUs, CPU
tasks prepare the reads and feed the encoders ``uint8`` batches; on CPU-only clusters each encoder reads
and prepares its own (``ScoreConfig.prepare``). Scored rows reach the sink as each read finishes.

``--resume`` skips shards whose sidecar exists and, in the others, the rows that committed part files
hold; it scores only the rest (scoring is deterministic, so the sidecars come out as a straight run's).
A resumed run must use the same model (content hash), embedding size and output-affecting settings.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data import Datasink

from pipelines.progress import ProgressReporter, RunTracker
from pipelines.ray_runtime import ensure_ray
from vlp.config import ConfigError, to_dict
from vlp.data.schema import ShardKind
from vlp.data.shards import ShardFolder
from vlp.data.storage import Storage, join
from vlp.scoring.batches import prepare_score_batch, score_batch
from vlp.scoring.config import ScoreConfig
from vlp.scoring.sidecar import (HISTOGRAM_PNG, MANIFEST, PARTS_DIR, SHARD_STATS_DIR, STATS,
                                 ScoreHistogram, folder_digest, part_schema, plot_histogram,
                                 read_json, scores_folder, shard_stem, sidecar_schema, write_json)


class ScoringError(RuntimeError):
    """Scoring did not finish; the message says why and what to do."""


def _media_column(kind: ShardKind, config: ScoreConfig, model_frames: int) -> tuple[str, int]:
    """(shard column with the pixels, frame slots per row) for this model and setting."""
    if kind is ShardKind.VIDEO_TEXT and model_frames > 1:
        return "frames", model_frames
    if kind is ShardKind.VIDEO_TEXT and config.video_frames == "mean":
        return "frames", config.video_max_frames
    return "image", max(1, model_frames)


def plan_reads(shards, rows_per_read: int, scored: dict[str, np.ndarray] | None = None) -> list[dict]:
    """The job's units of work: row ranges of at most ``rows_per_read`` rows of each shard (several
    per shard, so that a few large shards still spread over every encoder), leaving out the rows in
    ``scored`` (shard name -> row numbers already committed by an interrupted run)."""
    reads = []
    for s in shards:
        name = s.path.rsplit("/", 1)[-1]
        todo = np.ones(s.rows, dtype=bool)
        todo[(scored or {}).get(name, np.empty(0, np.int64))] = False
        edges = np.flatnonzero(np.diff(np.concatenate([[0], todo.astype(np.int8), [0]])))
        for first, end in zip(edges[::2], edges[1::2]):  # each run of rows still to score
            reads += [{"shard": name, "path": s.path, "start": int(start),
                       "rows": int(min(rows_per_read, end - start))}
                      for start in range(first, end, rows_per_read)]
    return reads


def committed_rows(output: str, storage: Storage, shard_name: str) -> np.ndarray:
    """Row numbers of a shard that committed part files already hold."""
    folder = join(output, PARTS_DIR, shard_stem(shard_name))
    rows = [np.empty(0, np.int64)]
    for uri in (storage.list_files(folder) if storage.exists(folder) else []):
        if uri.endswith(".parquet"):
            with storage.open_input(uri) as f:
                rows.append(pq.read_table(pa.BufferReader(f.read()), columns=["row"])
                            .column("row").to_numpy())
    return np.concatenate(rows)


def read_and_prepare(reads: pa.Table, *, storage: Storage, media_column: str, batch_size: int,
                     prepare: dict):
    """Row ranges of shards -> prepared batches, each row with its shard and row number.

    Reads only the row groups a range overlaps (curated shards have groups of 1,024 rows)."""
    for read in reads.to_pylist():
        first, end = read["start"], read["start"] + read["rows"]
        fs, path = storage.resolve(read["path"])
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            groups, row, at = [], None, 0
            for g in range(parquet.metadata.num_row_groups):
                n = parquet.metadata.row_group(g).num_rows
                if at < end and at + n > first:
                    groups.append(g)
                    row = at if row is None else row
                at += n
            for batch in parquet.iter_batches(batch_size=batch_size, row_groups=groups,
                                              columns=["key", "caption", "lang", media_column]):
                lo, hi = max(first - row, 0), min(end - row, batch.num_rows)
                if hi > lo:
                    yield prepare_score_batch(_batch_columns(batch.slice(lo, hi - lo), media_column,
                                                             read["shard"], row + lo), **prepare)
                row += batch.num_rows


def _batch_columns(batch: pa.RecordBatch, media_column: str, shard: str, row: int) -> dict:
    n = batch.num_rows
    return {"media": batch.column(media_column).to_pylist(),
            "caption": batch.column("caption").to_pylist(),
            "key": np.array(batch.column("key").to_pylist(), dtype=object),
            "lang": np.array(batch.column("lang").to_pylist(), dtype=object),
            "shard": np.array([shard] * n, dtype=object),
            "row": np.arange(row, row + n, dtype=np.int64)}


class ScoreEncoder:
    """Ray Data actor: holds the model on its device and scores prepared batches."""

    def __init__(self, model_path: str, precision: str, cpus: float, embeddings: bool):
        import torch

        from vlp.train.pretrained import load_dual_encoder

        torch.set_num_threads(max(1, int(cpus)))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        use_bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        self.autocast = torch.bfloat16 if use_bf16 else None
        loaded = load_dual_encoder(model_path, device=self.device)
        self.model, self.preprocess = loaded.model, loaded.preprocess
        self.embeddings = embeddings

    def __call__(self, batch: dict) -> dict:
        scored = score_batch(self.model, batch, preprocess=self.preprocess, device=self.device,
                             autocast_dtype=self.autocast)
        out = {"shard": batch["shard"], "row": batch["row"], "key": batch["key"], "lang": batch["lang"],
               "clip_score": scored["clip_score"]}
        if self.embeddings:
            out["image_embedding"] = scored["image_embedding"].astype(np.float16)
            out["text_embedding"] = scored["text_embedding"].astype(np.float16)
        return out


class ReadingScoreEncoder(ScoreEncoder):
    """Ray Data actor for CPU-only clusters: reads and prepares its row ranges itself, then scores.

    On CPUs the encoder and the preparation compete for the same cores, so handing batches between
    processes only adds copies: each encoder reading its own ranges keeps every core on one thread of
    work (measured in benchmarks/README.md)."""

    def __init__(self, *, read: dict, **encoder):
        super().__init__(**encoder)
        self.read = read

    def __call__(self, reads: pa.Table):
        for batch in read_and_prepare(reads, **self.read):
            yield super().__call__(batch)


class ScorePartSink(Datasink):
    """Commits the rows it gets as one part file per shard (atomically), and counts them."""

    def __init__(self, output: str, storage: Storage, embeddings: bool, tracker):
        self.output, self.storage, self.embeddings, self.tracker = output, storage, embeddings, tracker

    def get_name(self) -> str:
        return "ScorePartWrite"

    def write(self, blocks, ctx) -> list[dict]:
        tables = [b if isinstance(b, pa.Table) else pa.Table.from_pandas(b) for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return []
        table = pa.concat_tables(tables, promote_options="default")
        schema = part_schema(self.embeddings)
        written = []
        shards = table.column("shard").to_numpy(zero_copy_only=False)
        for shard in sorted(set(shards.tolist())):
            rows = table.filter(pa.array(shards == shard))
            scores = rows.column("clip_score").to_numpy(zero_copy_only=False)
            columns = {name: rows.column(name) for name in schema.names if name != "clip_score"}
            columns["clip_score"] = pa.array(np.where(np.isnan(scores), None, scores),
                                             type=pa.float32(), from_pandas=True)
            part = pa.table({name: columns[name] for name in schema.names}).cast(schema)
            sink = pa.BufferOutputStream()
            pq.write_table(part, sink, compression="zstd")
            uri = join(self.output, PARTS_DIR, shard_stem(shard), f"part-{uuid.uuid4().hex}.parquet")
            self.storage.write_bytes_atomic(uri, sink.getvalue())
            failed = int(np.isnan(scores).sum())
            self.tracker.processed_batch.remote(len(scores), len(scores) - failed,
                                                {"undecodable_image": failed} if failed else {})
            written.append({"shard": shard, "rows": len(scores)})
        return written


def _finalize_shard(output: str, storage: Storage, shard_name: str, rows: int,
                    embeddings: bool) -> ScoreHistogram:
    """A shard's parts -> its sidecar (rows in order, each once) and its histogram."""
    folder = join(output, PARTS_DIR, shard_stem(shard_name))
    parts = [f for f in storage.list_files(folder) if f.endswith(".parquet")] \
        if storage.exists(folder) else []
    tables = []
    for uri in parts:
        with storage.open_input(uri) as f:
            tables.append(pq.read_table(pa.BufferReader(f.read())))
    if not tables:
        raise ScoringError(f"no scores were committed for {shard_name}: rerun with --resume")
    table = pa.concat_tables(tables).sort_by("row")
    order = table.column("row").to_numpy()
    first = np.concatenate([[True], order[1:] != order[:-1]])  # a retried write committed it twice
    table = table.filter(pa.array(first))
    if table.num_rows != rows or not np.array_equal(table.column("row").to_numpy(), np.arange(rows)):
        raise ScoringError(f"{shard_name}: {table.num_rows} of {rows} rows were scored; rerun with "
                           "--resume")
    sidecar = table.select(sidecar_schema(embeddings).names)
    sink = pa.BufferOutputStream()
    pq.write_table(sidecar, sink, compression="zstd")
    storage.write_bytes_atomic(join(output, shard_name), sink.getvalue())
    scores = table.column("clip_score").to_numpy(zero_copy_only=False).astype(np.float64)
    valid = ~np.isnan(scores)
    hist = ScoreHistogram()
    hist.add(scores[valid], np.asarray(table.column("lang").to_pylist(), dtype=object)[valid].tolist(),
             failed=int((~valid).sum()))
    write_json(storage, join(output, SHARD_STATS_DIR, shard_stem(shard_name) + ".json"), hist.to_json())
    for uri in parts:
        storage.delete(uri)
    return hist


def _check_resume(existing: dict | None, output: str, resume: bool, storage: Storage,
                  manifest: dict) -> None:
    if existing is None:
        if storage.exists(output) and storage.list_files(output) and not resume:
            raise ScoringError(f"{output} is not empty and holds no scoring run; choose another --name")
        return
    if not resume:
        raise ScoringError(f"{output} already holds scores named {os.path.basename(output)!r}: pass "
                           "--resume to finish that run, or choose another --name")
    if existing["embedding_dim"] != manifest["embedding_dim"]:
        raise ScoringError(f"cannot append to {output}: its sidecars hold {existing['embedding_dim']}-d "
                           f"embeddings, this model gives {manifest['embedding_dim']}-d ones; choose "
                           "another --name")
    if existing["model"]["sha256"] != manifest["model"]["sha256"]:
        raise ScoringError(f"cannot resume {output}: it was scored with model "
                           f"{existing['model']['path']} ({existing['model']['sha256']}), not "
                           f"{manifest['model']['path']} ({manifest['model']['sha256']})")
    if existing["settings"] != manifest["settings"]:
        raise ScoringError(f"cannot resume {output}: it was scored with settings "
                           f"{existing['settings']}, this run asks for {manifest['settings']}")


def run_scoring(shards: str, model_path: str, name: str, config: ScoreConfig, *, resume: bool = False,
                stream=None) -> dict:
    """Score the shard folder ``shards`` with the model at ``model_path`` into ``_scores/<name>/``;
    returns the statistics.

    Raises:
        ConfigError, ScoringError: with a message for a person (bad folder, model, name or resume).
    """
    from vlp.train.pretrained import load_dual_encoder

    started = time.monotonic()
    stream = stream or sys.stderr  # looked up per call, not at import (captured streams close)
    if not name or "/" in name or name.startswith((".", "_")):
        raise ConfigError(f"--name {name!r}: give a plain name (letters, digits, '-', '_')")
    storage = Storage(config.storage)
    folder = ShardFolder.open(shards, storage).require_rows("to score")
    output = scores_folder(shards, name)
    if not os.path.exists(model_path):
        raise ConfigError(f"--model {model_path}: no such folder (a vlp train checkpoint or a "
                          "Hugging Face model folder)")
    loaded = load_dual_encoder(model_path)  # here, so that a bad folder fails before Ray starts
    model_frames = getattr(loaded.model.cfg, "num_frames", 1)
    media_column, frame_slots = _media_column(folder.kind, config, model_frames)
    manifest = {
        "status": "in_progress", "name": name, "shards": shards,
        "shards_manifest_sha256": folder.manifest_sha256, "kind": folder.kind.value,
        "model": {"path": os.path.abspath(model_path), "sha256": folder_digest(model_path),
                  **loaded.source},
        "embedding_dim": int(loaded.model.cfg.embed_dim), "preprocess": to_dict(loaded.preprocess),
        "max_text_length": loaded.max_text_length, "settings": config.output_affecting(),
        "media_column": media_column,
    }
    existing = read_json(storage, join(output, MANIFEST))
    _check_resume(existing, output, resume, storage, manifest)
    write_json(storage, join(output, MANIFEST), manifest)
    todo = [s for s in folder.shards
            if not storage.exists(join(output, s.path.rsplit("/", 1)[-1]))]
    # rows an interrupted run committed (same model and settings, checked above) are not scored again
    scored = {shard_name: committed_rows(output, storage, shard_name)
              for shard_name in (shard.path.rsplit("/", 1)[-1] for shard in todo)}
    done = len(folder.shards) - len(todo)
    print(f"[score] {folder.rows:,} {folder.kind.value} pairs in {len(folder.shards)} shards of "
          f"{shards} with {loaded.source.get('model_class', 'model')} from {model_path} -> {output}"
          + (f" (resuming: {done} shards already scored)" if done else ""), file=stream, flush=True)
    resumed_rows = sum(len(np.unique(r)) for r in scored.values())
    if resumed_rows:
        print(f"[score] {resumed_rows:,} rows of unfinished shards were committed before: not scored "
              "again", file=stream, flush=True)
    reads = plan_reads(todo, config.rows_per_read, scored)
    if reads:
        _score_shards(todo, reads, output, storage, config, model_path, loaded, media_column,
                      frame_slots, model_frames, stream)
    hist = ScoreHistogram()
    for i, shard in enumerate(folder.shards):
        shard_name = shard.path.rsplit("/", 1)[-1]
        stats_uri = join(output, SHARD_STATS_DIR, shard_stem(shard_name) + ".json")
        if shard in todo or not storage.exists(stats_uri):
            hist.merge(_finalize_shard(output, storage, shard_name, shard.rows, config.embeddings))
        else:
            hist.merge(ScoreHistogram.from_json(read_json(storage, stats_uri)))
    stats = {"rows": folder.rows, "scored": folder.rows - hist.failed, "failed": hist.failed,
             "failed_reason": "undecodable_image" if hist.failed else None,
             "clip_score": hist.summary(), "elapsed_s": round(time.monotonic() - started, 3)}
    write_json(storage, join(output, STATS), stats)
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_histogram(hist, os.path.join(tmp, HISTOGRAM_PNG), f"clip_score: {name}")
        with open(png, "rb") as f:
            storage.write_bytes_atomic(join(output, HISTOGRAM_PNG), f.read())
    manifest.update(status="complete", rows=folder.rows,
                    sidecars=[s.path.rsplit("/", 1)[-1] for s in folder.shards])
    write_json(storage, join(output, MANIFEST), manifest)
    print(format_score_summary(stats, output), file=stream, flush=True)
    return stats


def _score_shards(todo, reads, output, storage, config, model_path, loaded, media_column,
                  frame_slots, model_frames, stream) -> None:
    started_ray = ensure_ray(config.ray_address, dashboard=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0.0)
        in_encoder = config.prepare == "encoder" or (config.prepare == "auto" and not gpus)
        per_encoder = config.cpus_per_encoder + (0 if in_encoder else config.cpus_per_prepare_task)
        encoders = config.encoders or (max(1, int(gpus // config.gpus_per_encoder)) if gpus else
                                       max(1, int(resources.get("CPU", 1.0) // per_encoder)))
        prepare = dict(preprocess=loaded.preprocess, tokenizer=loaded.tokenizer,
                       max_text_length=loaded.max_text_length, video_frames=config.video_frames,
                       model_frames=model_frames, frame_slots=frame_slots)
        read = dict(storage=storage, media_column=media_column, batch_size=config.batch_size,
                    prepare=prepare)
        encoder = dict(model_path=os.path.abspath(model_path), precision=config.precision,
                       cpus=config.cpus_per_encoder, embeddings=config.embeddings)
        # A read is seconds of work: one in flight per reading encoder, or the first actor to start
        # queues the reads of a small job while the others idle.
        in_flight = 1 if in_encoder else None
        pool = dict(compute=ray.data.ActorPoolStrategy(size=encoders, max_tasks_in_flight_per_actor=in_flight),
                    num_cpus=config.cpus_per_encoder, num_gpus=config.gpus_per_encoder if gpus else 0)
        tracker = RunTracker.remote()
        ds = ray.data.from_items(reads, override_num_blocks=len(reads))
        if in_encoder:  # one range per call, so that every encoder gets its share
            ds = ds.map_batches(ReadingScoreEncoder, batch_size=1, batch_format="pyarrow",
                                fn_constructor_kwargs=dict(read=read, **encoder), **pool)
        else:
            # Ray Data fuses a task map into the actor map after it when their remote args are equal
            # (as they can be on a CPU-only cluster), which would put the prepare step back in the
            # encoders; Ray's own default of 3 retries, said explicitly, makes the args differ.
            ds = ds.map_batches(read_and_prepare, batch_size=1, batch_format="pyarrow",
                                num_cpus=config.cpus_per_prepare_task, fn_kwargs=read, max_retries=3)
            ds = ds.map_batches(ScoreEncoder, batch_size=config.batch_size, batch_format="numpy",
                                fn_constructor_kwargs=encoder, **pool)
        print(f"[score] {len(todo)} shards ({len(reads)} reads of up to {config.rows_per_read} rows) to "
              f"score with {encoders} encoder(s) on {'GPUs' if gpus else 'CPUs'}"
              + (", each reading its own rows" if in_encoder else ", fed by CPU prepare tasks"),
              file=stream, flush=True)
        with ProgressReporter(tracker, 10.0, stream, label="score"):
            ds.write_datasink(ScorePartSink(output, storage, config.embeddings, tracker),
                              ray_remote_args={"num_cpus": 0})
    finally:
        if started_ray:
            ray.shutdown()


def format_score_summary(stats: dict, output: str) -> str:
    lines = [f"[score] {stats['scored']:,} of {stats['rows']:,} pairs scored in {stats['elapsed_s']:.0f} s"
             + (f" ({stats['failed']:,} undecodable: null scores)" if stats["failed"] else "")]
    for lang, s in stats["clip_score"].items():
        q = s["quantiles"]
        lines.append(f"  {lang:<8} {s['rows']:>9,} rows  mean {s['mean']:.3f}  p10 {q['0.1']:.2f}  "
                     f"p50 {q['0.5']:.2f}  p90 {q['0.9']:.2f}")
    lines.append(f"[score] sidecars, stats and histogram in {output}")
    return "\n".join(lines)
