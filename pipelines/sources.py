"""Reading raw image-text and video-text pairs into Ray Data: manifests, folders with sidecar captions,
WebDataset tars.

``CaptionPairDatasource`` turns an input location into blocks of ``SOURCE_SCHEMA`` rows: a key, where
the image or video is (url or path) or its bytes themselves (tars), the raw caption, an optional
captioned segment (``start``/``end`` seconds, for videos), and, for rows that are already unusable
(invalid UTF-8, malformed line, no caption), a drop reason. ``media`` (``image`` or ``video``) decides
which file extensions a folder or tar holds. Parsing is row by row
so that one bad line costs one counted drop, not the run.

One read task per manifest or tar file (BM-6B-style inputs come as thousands of files), and one per
``files_per_task`` images of a folder. Rows whose key is already done (``--resume``) are skipped here,
before any work is spent on them.
"""

from __future__ import annotations

import csv
import json
import os
import posixpath
import tarfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from vlp.curation.config import InputConfig
from vlp.curation.dedup import key_owner
from vlp.data.storage import Storage, basename, dirname, is_s3, join

SOURCE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("source", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("lang_hint", pa.string()),
        # The media bytes when the input carries them (tar members); null when fetched by source.
        pa.field("data", pa.binary()),
        # A captioned segment of a video, in seconds (null: the whole video).
        pa.field("start", pa.float64()),
        pa.field("end", pa.float64()),
        pa.field("drop_reason", pa.string()),
        pa.field("drop_detail", pa.string()),
    ]
)

IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"}
VIDEO_EXTENSIONS = {"mp4", "m4v", "mov", "webm", "mkv", "avi", "mpg", "mpeg", "flv", "wmv", "ts", "3gp",
                    "ogv"}
MEDIA_EXTENSIONS = {"image": IMAGE_EXTENSIONS, "video": VIDEO_EXTENSIONS}
MANIFEST_FORMATS = {"jsonl": "jsonl", "json": "jsonl", "csv": "csv", "parquet": "parquet"}


class InputError(ValueError):
    """The input location cannot be read as the configured format."""


@dataclass(frozen=True)
class InputUnit:
    kind: str  # jsonl | csv | parquet | webdataset | folder
    uri: str  # the file (or, for folder units, the folder root)
    rel: str  # key prefix: the file's path relative to the input root, without extension
    files: tuple = ()  # folder units: (media uri, caption uri or "") pairs
    media: str = "image"  # which extensions are media files: "image" or "video"


def _ext(uri: str) -> str:
    name = basename(uri).lower()
    return name.rsplit(".", 1)[-1] if "." in name else ""


def _relative_stem(root: str, uri: str) -> str:
    rel = uri[len(root) :].lstrip("/") if uri.startswith(root) else basename(uri)
    rel = rel or basename(uri)
    return rel.rsplit(".", 1)[0] if "." in posixpath.basename(rel) else rel


def plan_inputs(src: str, config: InputConfig, storage: Storage, media: str = "image") -> list[InputUnit]:
    """Find the units of work under ``src`` (a file or a folder) of ``media`` files."""
    extensions = MEDIA_EXTENSIONS[media]
    if not storage.exists(src):
        raise InputError(f"input not found: {src}")
    files = storage.list_files(src)
    if not files:
        raise InputError(f"input folder is empty: {src}")
    root = src if storage.is_dir(src) else dirname(src)
    if not is_s3(root):
        root = os.path.abspath(root)
    fmt = config.format
    if fmt == "auto":
        exts = {_ext(f) for f in files if not basename(f).startswith((".", "_"))}
        if exts & set(MANIFEST_FORMATS):
            fmt = "manifest"
        elif "tar" in exts:
            fmt = "webdataset"
        elif exts & extensions:
            fmt = "folder"
        else:
            raise InputError(
                f"cannot tell the input format of {src}: no .jsonl/.csv/.parquet manifest, .tar or "
                f"{media} files; set input.format"
            )
    if fmt in ("manifest", "jsonl", "csv", "parquet"):
        units = []
        for f in files:
            kind = MANIFEST_FORMATS.get(_ext(f))
            if kind is None or basename(f).startswith((".", "_")) or (fmt != "manifest" and kind != fmt):
                continue
            units.append(InputUnit(kind, f, _relative_stem(root, f), media=media))
        if not units:
            raise InputError(f"no {fmt} manifest files under {src}")
        return units
    if fmt == "webdataset":
        units = [InputUnit("webdataset", f, _relative_stem(root, f), media=media)
                 for f in files if _ext(f) == "tar"]
        if not units:
            raise InputError(f"no .tar files under {src}")
        return units
    # folder: media files with sidecar captions (stem.txt or stem.json)
    by_stem: dict[str, dict[str, str]] = {}
    for f in files:
        if basename(f).startswith("."):
            continue
        stem = f.rsplit(".", 1)[0] if "." in basename(f) else f
        by_stem.setdefault(stem, {})[_ext(f)] = f
    pairs = []
    for stem in sorted(by_stem):
        entry = by_stem[stem]
        found = [entry[e] for e in entry if e in extensions]
        if not found:
            continue
        caption = entry.get("txt") or entry.get("json") or ""
        pairs.append((found[0], caption))
    if not pairs:
        raise InputError(f"no {media} files under {src}")
    step = max(1, config.files_per_task)
    return [
        InputUnit("folder", root, "", tuple(pairs[i : i + step]), media=media)
        for i in range(0, len(pairs), step)
    ]


class _RowBuffer:
    """Accumulates source rows and emits them as Arrow tables of bounded size."""

    def __init__(self, rows_per_block: int, done: np.ndarray | None):
        self.rows_per_block = rows_per_block
        self.done = done
        self.columns: dict[str, list] = {f.name: [] for f in SOURCE_SCHEMA}

    def add(self, key, source, caption=None, lang=None, data=None, reason=None, detail=None,
            start=None, end=None):
        c = self.columns
        c["key"].append(key)
        c["source"].append(source)
        c["caption"].append(caption)
        c["lang_hint"].append(lang)
        c["data"].append(data)
        c["start"].append(start)
        c["end"].append(end)
        c["drop_reason"].append(reason)
        c["drop_detail"].append(detail)

    def full(self) -> bool:
        return len(self.columns["key"]) >= self.rows_per_block

    def flush(self) -> pa.Table | None:
        if not self.columns["key"]:
            return None
        table = pa.Table.from_pydict(self.columns, schema=SOURCE_SCHEMA)
        self.columns = {f.name: [] for f in SOURCE_SCHEMA}
        if self.done is not None and len(self.done) and table.num_rows:
            owners = key_owner(table.column("key").to_pylist())
            idx = np.searchsorted(self.done, owners)
            idx[idx >= len(self.done)] = 0
            table = table.filter(pa.array(self.done[idx] != owners))
        return table if table.num_rows else None


def _valid_utf8(value) -> bool:
    if not isinstance(value, str):
        return True
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _as_text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, float) and value != value:  # NaN from CSV/parquet
        return None
    return str(value)


def _as_seconds(value) -> float | None:
    """A segment bound from a manifest field: a number of seconds, or empty."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    seconds = float(value)  # ValueError for text that is not a number
    if seconds != seconds or seconds < 0:
        raise ValueError(f"segment bound {value!r} is not a time in seconds")
    return seconds


def _resolve_path(manifest: str, path: str) -> str:
    if path.startswith(("s3://", "http://", "https://", "/")):
        return path
    return join(dirname(manifest), path)


class _ManifestRowEmitter:
    """Turns one manifest record (a dict) into a source row or a counted drop."""

    def __init__(self, unit: InputUnit, config: InputConfig, out: _RowBuffer):
        self.unit, self.config, self.out = unit, config, out

    def emit(self, index: int, record: dict | None, error: tuple[str, str] | None = None):
        cfg = self.config
        default_key = f"{self.unit.rel}-{index:09d}"
        if record is None:
            reason, detail = error or ("malformed_row", "")
            self.out.add(default_key, f"{self.unit.uri}#{index}", reason=reason, detail=detail)
            return
        key = _as_text(record.get(cfg.key_column)) or default_key
        url = _as_text(record.get(cfg.url_column))
        path = _as_text(record.get(cfg.path_column))
        caption = _as_text(record.get(cfg.caption_column))
        lang = _as_text(record.get(cfg.lang_column))
        source = url or (path and _resolve_path(self.unit.uri, path)) or f"{self.unit.uri}#{index}"
        try:
            start = _as_seconds(record.get(cfg.start_column))
            end = _as_seconds(record.get(cfg.end_column))
            if start is not None and end is not None and end <= start:
                raise ValueError(f"segment end {end} is not after its start {start}")
        except (TypeError, ValueError) as e:
            self.out.add(key if _valid_utf8(key) else default_key, f"{self.unit.uri}#{index}",
                         reason="bad_segment", detail=str(e)[:200])
            return
        if not all(_valid_utf8(v) for v in (key, url, path, caption, lang)):
            safe_key = key if _valid_utf8(key) else default_key
            safe_source = source if _valid_utf8(source) else f"{self.unit.uri}#{index}"
            self.out.add(safe_key, safe_source, reason="invalid_utf8", detail="caption or field")
        elif not (url or path):
            self.out.add(key, source, caption, reason="missing_source",
                         detail=f"no {cfg.url_column!r} or {cfg.path_column!r}")
        elif caption is None or not caption.strip():
            self.out.add(key, source, reason="missing_caption")
        else:
            self.out.add(key, source, caption, lang, start=start, end=end)


def _iter_lines(stream, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """Lines of a binary stream that only supports ``read`` (Arrow input streams, S3 objects)."""
    pending = b""
    while True:
        chunk = stream.read(chunk_size)
        if not chunk:
            break
        pending += chunk
        lines = pending.split(b"\n")
        pending = lines.pop()
        yield from lines
    if pending:
        yield pending


def _read_jsonl(unit, config, storage, out) -> Iterator[pa.Table]:
    emitter = _ManifestRowEmitter(unit, config, out)
    with storage.open_input(unit.uri) as f:
        index = 0
        for raw in _iter_lines(f):
            if not raw.strip():
                continue
            text = raw.decode("utf-8", "surrogateescape")
            try:
                record = json.loads(text)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
                emitter.emit(index, record)
            except ValueError as e:
                emitter.emit(index, None, ("malformed_row", str(e)[:200]))
            index += 1
            if out.full() and (t := out.flush()) is not None:
                yield t


def _read_csv(unit, config, storage, out) -> Iterator[pa.Table]:
    emitter = _ManifestRowEmitter(unit, config, out)
    with storage.open_input(unit.uri) as f:
        # Streamed line by line; the newline goes back on so quoted multi-line fields still parse.
        lines = (raw.decode("utf-8", "surrogateescape") + "\n" for raw in _iter_lines(f))
        reader = csv.DictReader(lines)
        try:
            for index, record in enumerate(reader):
                if None in record:  # more fields than the header names
                    emitter.emit(index, None, ("malformed_row", "extra fields"))
                else:
                    emitter.emit(index, record)
                if out.full() and (t := out.flush()) is not None:
                    yield t
        except csv.Error as e:
            emitter.emit(reader.line_num, None, ("malformed_row", str(e)[:200]))


def _read_parquet(unit, config, storage, out) -> Iterator[pa.Table]:
    emitter = _ManifestRowEmitter(unit, config, out)
    fs, path = storage.resolve(unit.uri)
    with fs.open_input_file(path) as f:  # random access: row groups are read one at a time
        pf = pq.ParquetFile(f)
        wanted = [c for c in (config.key_column, config.url_column, config.path_column,
                              config.caption_column, config.lang_column, config.start_column,
                              config.end_column) if c in pf.schema_arrow.names]
        index = 0
        for batch in pf.iter_batches(batch_size=config.rows_per_block, columns=wanted):
            for record in batch.to_pylist():
                emitter.emit(index, record)
                index += 1
                if out.full() and (t := out.flush()) is not None:
                    yield t


def _caption_from_json(data: bytes) -> str | None:
    obj = json.loads(data.decode("utf-8", "surrogateescape"))
    if isinstance(obj, dict):
        for k in ("caption", "text", "txt"):
            if obj.get(k) is not None:
                return str(obj[k])
    return None


def _read_tar(unit, config, storage, out) -> Iterator[pa.Table]:
    """WebDataset tar: members grouped by key (path up to the first dot of the file name)."""
    extensions = MEDIA_EXTENSIONS[unit.media]
    current: str | None = None
    group: dict[str, bytes] = {}

    def emit_group():
        key = f"{unit.rel}/{current}"
        source = f"{unit.uri}#{current}"
        media_ext = next((e for e in group if e in extensions), None)
        try:
            if "txt" in group:
                caption = group["txt"].decode("utf-8", "surrogateescape")
            elif "json" in group:
                caption = _caption_from_json(group["json"])
            else:
                caption = None
        except ValueError:
            out.add(key, source, reason="malformed_row", detail="bad json sidecar")
            return
        if media_ext is None:
            out.add(key, source, caption if _valid_utf8(caption) else None,
                    reason=f"missing_{unit.media}", detail=f"members: {sorted(group)}")
        elif not _valid_utf8(caption):
            out.add(key, source, reason="invalid_utf8", detail="caption")
        elif caption is None or not caption.strip():
            out.add(key, source, reason="missing_caption")
        else:
            out.add(key, source, caption, data=group[media_ext])

    try:
        with storage.open_input(unit.uri) as f:
            with tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    d, name = posixpath.split(member.name)
                    if "." not in name or name.startswith("."):
                        continue
                    stem, ext = name.split(".", 1)
                    member_key = posixpath.join(d, stem) if d else stem
                    if member_key != current:
                        if current is not None:
                            emit_group()
                        current, group = member_key, {}
                    handle = tar.extractfile(member)
                    group[ext.lower()] = handle.read() if handle else b""
                    if out.full() and (t := out.flush()) is not None:
                        yield t
    except (tarfile.TarError, OSError, EOFError) as e:
        # A truncated or corrupt archive: keep every complete sample before the damage, count the rest.
        if current is not None:
            emit_group()  # an incomplete last sample becomes a counted missing_image/caption drop
            current = None
        out.add(f"{unit.rel}/__corrupt_archive__", unit.uri, reason="corrupt_archive",
                detail=str(e)[:200])
    if current is not None:
        emit_group()


def _read_folder(unit, config, storage, out) -> Iterator[pa.Table]:
    for media_uri, caption_uri in unit.files:
        key = _relative_stem(unit.uri, media_uri)
        if out.done is not None and len(out.done):
            owner = key_owner([key])[0]
            i = np.searchsorted(out.done, owner)
            if i < len(out.done) and out.done[i] == owner:
                continue
        if not caption_uri:
            out.add(key, media_uri, reason="missing_caption", detail="no sidecar .txt/.json")
        else:
            try:
                raw = storage.read_bytes(caption_uri, max_bytes=1 << 20)
                caption = (_caption_from_json(raw) if caption_uri.endswith(".json")
                           else raw.decode("utf-8"))
                out.add(key, media_uri, caption)
            except UnicodeDecodeError:
                out.add(key, media_uri, reason="invalid_utf8", detail=caption_uri)
            except (ValueError, OSError) as e:
                out.add(key, media_uri, reason="malformed_row", detail=str(e)[:200])
        if out.full() and (t := out.flush()) is not None:
            yield t


_READERS = {
    "jsonl": _read_jsonl,
    "csv": _read_csv,
    "parquet": _read_parquet,
    "webdataset": _read_tar,
    "folder": _read_folder,
}


def read_unit(
    unit: InputUnit, config: InputConfig, storage: Storage, done: np.ndarray | None = None
) -> Iterator[pa.Table]:
    """All source rows of one unit, in blocks (rows whose key hash is in ``done`` are skipped)."""
    # Tars carry image bytes in the rows: keep their blocks small.
    per_block = min(config.rows_per_block, 64) if unit.kind == "webdataset" else config.rows_per_block
    out = _RowBuffer(per_block, done)
    try:
        for table in _READERS[unit.kind](unit, config, storage, out):
            yield table
    except FileNotFoundError:
        out.add(f"{unit.rel}/__missing__", unit.uri, reason="file_not_found", detail=unit.uri)
    except OSError as e:
        out.add(f"{unit.rel}/__unreadable__", unit.uri, reason="read_error", detail=str(e)[:200])
    if (t := out.flush()) is not None:
        yield t


class CaptionPairDatasource(Datasource):
    """Ray Data datasource over planned input units."""

    def __init__(self, units: list[InputUnit], config: InputConfig, storage: Storage, done_ref=None):
        super().__init__()
        self.units, self.config, self.storage, self.done_ref = units, config, storage, done_ref

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
        tasks = []
        for unit in self.units:
            def read(unit=unit, config=self.config, storage=self.storage, done_ref=self.done_ref):
                import ray

                done = ray.get(done_ref) if done_ref is not None else None
                yield from read_unit(unit, config, storage, done)

            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None,
                                 input_files=[unit.uri] if unit.kind != "folder" else None)
            tasks.append(ReadTask(read, meta, schema=SOURCE_SCHEMA))
        return tasks
