"""Where bytes live: local paths and ``s3://`` URIs behind one small interface.

Everything that reads or writes files (manifests, images, shards, records) goes through ``Storage`` so
that local folders and S3 behave the same, including atomic writes:

- local: write to a hidden temporary name in the same folder, then ``rename`` (atomic on POSIX);
- S3: a single PUT (or a completed multipart upload) is atomic by itself, an object is either whole
  or absent, so the object is written under its final key directly.

Credentials never pass through configs: S3 keys come from the environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``) as the AWS tools read them.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs


@dataclass(frozen=True)
class StorageConfig:
    """How to reach object storage. No secrets here: keys come from the environment.

    Attributes:
        s3_endpoint_url: e.g. ``http://127.0.0.1:8333`` for a local S3 server; empty for AWS (or the
            ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` environment variables when set).
        s3_region: region name passed to the client.
    """

    s3_endpoint_url: str = ""
    s3_region: str = "us-east-1"


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join path parts under a local path or an ``s3://`` URI."""
    if is_s3(base):
        return "s3://" + posixpath.join(base[len("s3://") :], *parts)
    return os.path.join(base, *parts)


def dirname(uri: str) -> str:
    if is_s3(uri):
        return "s3://" + posixpath.dirname(uri[len("s3://") :])
    return os.path.dirname(uri)


def basename(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/")) if is_s3(uri) else os.path.basename(uri.rstrip("/"))


def _s3_filesystem(config: StorageConfig) -> pafs.S3FileSystem:
    endpoint = (
        config.s3_endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3", "")
        or os.environ.get("AWS_ENDPOINT_URL", "")
    )
    kwargs: dict = {"region": config.s3_region, "allow_bucket_creation": True}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        if not host:
            scheme, host = "https", endpoint
        kwargs.update(endpoint_override=host, scheme=scheme)
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs.update(
            access_key=key, secret_key=secret, session_token=os.environ.get("AWS_SESSION_TOKEN")
        )
    return pafs.S3FileSystem(**kwargs)


class Storage:
    """File operations on local paths and ``s3://`` URIs.

    One instance per process is enough; it is cheap to pickle (the filesystem is rebuilt lazily), so it
    can travel inside Ray tasks and actors.
    """

    def __init__(self, config: StorageConfig | None = None):
        self.config = config or StorageConfig()
        self._s3: pafs.S3FileSystem | None = None
        self._local = pafs.LocalFileSystem()

    def __getstate__(self):
        return {"config": self.config}

    def __setstate__(self, state):
        self.__init__(state["config"])

    def resolve(self, uri: str) -> tuple[pafs.FileSystem, str]:
        if is_s3(uri):
            if self._s3 is None:
                self._s3 = _s3_filesystem(self.config)
            return self._s3, uri[len("s3://") :]
        return self._local, os.path.abspath(uri)

    def read_bytes(self, uri: str, max_bytes: int | None = None) -> bytes:
        """Read a whole file; raise ``ValueError`` when it is larger than ``max_bytes``.

        The size is checked before reading (a ``read(max_bytes + 1)`` would allocate the whole cap
        for every small file); local files go through plain ``open``, the fastest path for the
        hot loop of curation.
        """
        if not is_s3(uri):
            with open(uri, "rb") as f:
                if max_bytes is not None and os.fstat(f.fileno()).st_size > max_bytes:
                    raise ValueError(f"file larger than {max_bytes} bytes")
                return f.read()
        fs, path = self.resolve(uri)
        with fs.open_input_file(path) as f:
            if max_bytes is not None and f.size() > max_bytes:
                raise ValueError(f"file larger than {max_bytes} bytes")
            return f.readall()

    def open_input(self, uri: str):
        fs, path = self.resolve(uri)
        return fs.open_input_stream(path)

    def exists(self, uri: str) -> bool:
        fs, path = self.resolve(uri)
        return fs.get_file_info(path).type != pafs.FileType.NotFound

    def is_dir(self, uri: str) -> bool:
        fs, path = self.resolve(uri)
        return fs.get_file_info(path).type == pafs.FileType.Directory

    def size(self, uri: str) -> int:
        fs, path = self.resolve(uri)
        return fs.get_file_info(path).size

    def list_files(self, uri: str, recursive: bool = True) -> list[str]:
        """Files under a folder (or the file itself), as URIs of the same kind, sorted."""
        fs, path = self.resolve(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [uri]
        if info.type == pafs.FileType.NotFound:
            return []
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
        prefix = "s3://" if is_s3(uri) else ""
        return sorted(prefix + i.path for i in infos if i.type == pafs.FileType.File)

    def makedirs(self, uri: str) -> None:
        fs, path = self.resolve(uri)
        fs.create_dir(path, recursive=True)

    def write_bytes_atomic(self, uri: str, data: bytes | pa.Buffer) -> None:
        """Write so that readers see either nothing or the whole file, never a part of it."""
        if is_s3(uri):  # already whole in memory: one PUT, without atomic_output's buffer copy
            self._put_object(uri, data)
            return
        with self.atomic_output(uri) as f:
            f.write(data)

    def _put_object(self, uri: str, data: bytes | pa.Buffer) -> None:
        """One S3 PUT of the whole object: it appears complete or not at all."""
        fs, path = self.resolve(uri)
        with fs.open_output_stream(path) as f:
            f.write(data)

    @contextmanager
    def atomic_output(self, uri: str) -> Iterator:
        """A writable binary stream whose content appears at ``uri`` only if the block completes.

        Local files are written to a temporary name beside the target, synced and renamed, so a
        large file streams to disk instead of being held in memory. S3 objects are collected in
        memory and sent as one PUT on success (an S3 stream closed after an error would still
        complete its upload, and publish a partial object).
        """
        if is_s3(uri):
            buffer = pa.BufferOutputStream()
            yield buffer
            self._put_object(uri, buffer.getvalue())
            return
        _, path = self.resolve(uri)
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def delete(self, uri: str) -> None:
        fs, path = self.resolve(uri)
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass

    def walk_temporaries(self, uri: str) -> Iterator[str]:
        """Leftover temporary files of interrupted local writes under a folder."""
        for f in self.list_files(uri):
            if basename(f).startswith(".tmp-"):
                yield f
