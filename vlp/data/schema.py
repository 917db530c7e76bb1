"""The shard format: the one contract between curation (writer) and training (reader).

Shards are Parquet files of Arrow record batches. Every column is declared here once; curation writes
exactly ``IMAGE_TEXT_SCHEMA`` (or ``VIDEO_TEXT_SCHEMA``, which adds the video columns) and training
reads it with ``check_shard_schema``. A change that
removes or retypes a column bumps ``SCHEMA_VERSION``'s major number; adding a nullable column (video
columns, later scores) bumps the minor number and old readers keep working.

Each output folder also holds:

- ``_manifest.json``: schema version, ``kind`` (``ShardKind``), ``status`` (``in_progress`` until the
  run commits its last part, then ``complete``), the curation config and its hash, each shard with rows
  and bytes (read it with ``vlp.data.shards.ShardFolder``, which checks all of that);
- ``_stats.json``: rows read, written and dropped (per reason);
- ``_parts/part-NNNNN.json``: the commit record of one shard (the unit of resume);
- ``_drops/part-NNNNN.parquet``: every dropped row of that part with its reason (``DROPS_SCHEMA``);
- ``_rejects.jsonl``: a sample of rejects per reason, for a person to look at.

With ``output.format: webdataset`` the shards are tar files in the WebDataset layout instead
(``shard-NNNNNN.tar``, members named by ``webdataset_member``), each with a Parquet index of its rows'
non-pixel columns beside it (``shard-NNNNNN.index.parquet``); the manifest says ``format``. Everything
else above is the same. This package's readers read Parquet shards only.
"""

from __future__ import annotations

import string
from enum import StrEnum

import pyarrow as pa

# 1.1: video-text shards (the image-text columns plus the video columns); image-text shards unchanged.
SCHEMA_VERSION = "1.1"

MANIFEST_FILE = "_manifest.json"
# The manifest's ``status``: a folder is read for training, tokenizers and evaluation only once complete.
STATUS_IN_PROGRESS = "in_progress"
STATUS_COMPLETE = "complete"
STATS_FILE = "_stats.json"
REJECTS_FILE = "_rejects.jsonl"
PARTS_DIR = "_parts"
DROPS_DIR = "_drops"


# The manifest's ``format`` (``output.format``): what a shard file is.
FORMAT_PARQUET = "parquet"
FORMAT_WEBDATASET = "webdataset"


def shard_name(part: int, fmt: str = FORMAT_PARQUET) -> str:
    """Deterministic shard file name of a part number."""
    return f"shard-{part:06d}.{'tar' if fmt == FORMAT_WEBDATASET else 'parquet'}"


def shard_index_name(part: int) -> str:
    """The Parquet index beside a WebDataset shard: its rows' non-pixel columns, in tar order."""
    return f"shard-{part:06d}.index.parquet"


def part_record_name(part: int) -> str:
    return f"{PARTS_DIR}/part-{part:06d}.json"


def drops_name(part: int) -> str:
    return f"{DROPS_DIR}/part-{part:06d}.parquet"


IMAGE_TEXT_FIELDS: list[pa.Field] = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("caption", pa.string(), nullable=False),
    pa.field("lang", pa.string(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),
    pa.field("image_format", pa.string(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("orig_width", pa.int32(), nullable=False),
    pa.field("orig_height", pa.int32(), nullable=False),
    # Hex SHA-256 of the source bytes as fetched: the exact-duplicate key.
    pa.field("sha256", pa.string(), nullable=False),
    # 64-bit DCT perceptual hash of the decoded image, stored as the signed view of the bits.
    pa.field("phash", pa.int64(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
]

IMAGE_TEXT_SCHEMA = pa.schema(
    IMAGE_TEXT_FIELDS, metadata={b"vlp.schema_version": SCHEMA_VERSION.encode()}
)

# A video-text row is one clip of a source video. Its image-text columns keep their meaning where they
# can, so image-text readers also read video shards: ``image`` is the clip's middle sampled frame (a
# poster), ``width``/``height`` the stored frame size, ``orig_*`` the source video's, ``phash`` the hash
# of that middle frame, ``sha256`` the clip's identity (the source file's SHA-256 and the clip
# bounds: equal bytes and bounds are an exact duplicate).
VIDEO_FIELDS: list[pa.Field] = [
    # Encoded frames in time order, in the shard's image_format.
    pa.field("frames", pa.list_(pa.binary()), nullable=False),
    pa.field("frame_times_s", pa.list_(pa.float32()), nullable=False),
    pa.field("num_frames", pa.int32(), nullable=False),
    pa.field("fps", pa.float32(), nullable=False),
    # Duration of the whole source video, and the clip's place in it.
    pa.field("duration_s", pa.float32(), nullable=False),
    pa.field("clip_start_s", pa.float32(), nullable=False),
    pa.field("clip_end_s", pa.float32(), nullable=False),
    pa.field("clip_index", pa.int32(), nullable=False),
    # The source row's key: every clip of one video (or of one captioned segment) shares it.
    pa.field("video_id", pa.string(), nullable=False),
    # Mean absolute grey-level change between adjacent frames (0..1): the motion filter's score.
    pa.field("motion", pa.float32(), nullable=False),
]

VIDEO_TEXT_SCHEMA = pa.schema(
    IMAGE_TEXT_FIELDS + VIDEO_FIELDS, metadata={b"vlp.schema_version": SCHEMA_VERSION.encode()}
)



class ShardKind(StrEnum):
    """What a shard folder holds, written as the manifest's ``kind`` (a string in the JSON)."""

    IMAGE_TEXT = "image-text"
    VIDEO_TEXT = "video-text"

    @property
    def schema(self) -> pa.Schema:
        return SHARD_SCHEMAS[self]

    @property
    def source_key_column(self) -> str:
        """The column naming a row's source row: resume skips the source rows it lists."""
        return "video_id" if self is ShardKind.VIDEO_TEXT else "key"


SHARD_SCHEMAS = {ShardKind.IMAGE_TEXT: IMAGE_TEXT_SCHEMA, ShardKind.VIDEO_TEXT: VIDEO_TEXT_SCHEMA}

# Columns holding encoded pixels (stored uncompressed, and counted against output.shard_bytes).
PIXEL_COLUMNS = ("image", "frames")

# Every dropped row, with enough to find it again and know why.
DROPS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("source", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("caption", pa.string()),
    ]
)


# WebDataset splits a member name into sample key and field at the first dot of its last path
# component, and reads a slash as a folder: a key keeps only these characters as they are.
_WEBDATASET_KEY_SAFE = frozenset(string.ascii_letters + string.digits + "-_#+=@,")
# File extension of the stored image formats (``image_format``): what WebDataset decoders dispatch on.
_IMAGE_EXTENSIONS = {"jpeg": "jpg", "webp": "webp", "png": "png"}


def webdataset_key(key: str) -> str:
    """A row key as a WebDataset sample key (tar member stem): every character outside
    ``[A-Za-z0-9-_#+=@,]`` is percent-encoded as its UTF-8 bytes (``.`` is ``%2E``, ``/`` is ``%2F``,
    ``%`` is ``%25``), so distinct keys stay distinct and ``urllib.parse.unquote`` gives the key back.
    The ``.json`` member keeps the key as it is."""
    return "".join(c if c in _WEBDATASET_KEY_SAFE else "".join(f"%{b:02X}" for b in c.encode())
                   for c in key)


def webdataset_member(key: str, field: str, image_format: str | None = None) -> str:
    """The tar member name of one field of a row: ``<key>.<field>``, where ``field`` is ``txt`` or
    ``json``, or ``image`` (``jpg``/``webp`` per ``image_format``), or ``frameNNN`` (one video frame,
    ``NNN`` its zero-padded index, at least 3 digits; the image extension follows)."""
    stem = webdataset_key(key)
    if field == "image" or field.startswith("frame"):
        ext = _IMAGE_EXTENSIONS.get(image_format or "", image_format or "bin")
        return f"{stem}.{ext}" if field == "image" else f"{stem}.{field}.{ext}"
    return f"{stem}.{field}"


def schema_version_compatible(version: str) -> bool:
    """Whether data written at ``version`` reads with this code (same major number)."""
    return version.split(".")[0] == SCHEMA_VERSION.split(".")[0]


def check_shard_schema(schema: pa.Schema, expected: pa.Schema = IMAGE_TEXT_SCHEMA) -> None:
    """Raise ``ValueError`` naming the first column a shard lacks or types differently."""
    for field in expected:
        idx = schema.get_field_index(field.name)
        if idx < 0:
            raise ValueError(f"shard lacks column {field.name!r} (schema {SCHEMA_VERSION})")
        if not schema.field(idx).type.equals(field.type):
            raise ValueError(
                f"shard column {field.name!r} is {schema.field(idx).type}, expected {field.type}"
            )
    version = (schema.metadata or {}).get(b"vlp.schema_version", b"").decode()
    if version and not schema_version_compatible(version):
        raise ValueError(f"shard schema version {version} is incompatible with {SCHEMA_VERSION}")
