"""The artifact store: datasets, checkpoints and adapters, addressed by name and checked by sha256.

Writes go to a temporary file that is renamed into place only when complete, so a reader
never sees half an artifact and a crash leaves no partial one behind.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

_CHUNK = 1 << 20


class ArtifactError(Exception):
    """A missing artifact, a bad key or a checksum mismatch."""


@dataclass(frozen=True, slots=True)
class ArtifactInfo:
    """What the store knows of one artifact."""

    key: str
    size: int
    sha256: str


class ArtifactStore(Protocol):
    """Named blobs with checksums; a local folder now, an object store in production."""

    def put_file(self, key: str, source: Path) -> ArtifactInfo:
        """Copy ``source`` in under ``key``."""
        ...

    def put_bytes(self, key: str, data: bytes) -> ArtifactInfo:
        """Store ``data`` under ``key``."""
        ...

    def open(self, key: str) -> BinaryIO:
        """Read the artifact ``key``."""
        ...

    def info(self, key: str) -> ArtifactInfo:
        """Size and sha256 of ``key``."""
        ...

    def exists(self, key: str) -> bool:
        """Whether ``key`` is stored."""
        ...

    def list(self, prefix: str = "") -> Iterator[ArtifactInfo]:
        """Artifacts whose key starts with ``prefix``."""
        ...

    def uri(self, key: str) -> str:
        """The URI an ``ArtifactRef`` carries for ``key``."""
        ...

    def key_of(self, uri: str) -> str:
        """The key of one of this store's URIs; raises ``ArtifactError`` for others."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key`` (no error if absent)."""
        ...


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(
    folder: Path, *, skip: frozenset[str] = frozenset(), suffixes: tuple[str, ...] | None = None
) -> dict[str, str]:
    """Hex sha256 of every file under ``folder`` by relative path (sorted), leaving out
    names in ``skip`` and, when given, files whose name does not end in ``suffixes``."""
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in skip and (suffixes is None or p.name.endswith(suffixes))
    }


def atomic_write_text(path: Path, text: str, *, durable: bool = False) -> None:
    """Write ``text`` to ``path`` whole or not at all (a temporary file renamed into place).
    ``durable`` also fsyncs the file and its folder, so the rename survives a power loss."""
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def copy_out(store: ArtifactStore, key: str, target: Path) -> Path:
    """Copy artifact ``key`` to the local file ``target`` (its folder made as needed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with store.open(key) as source, target.open("wb") as sink:
        shutil.copyfileobj(source, sink, _CHUNK)
    return target


class LocalArtifactStore:
    """Artifacts as files under ``root``; each has a ``.sha256`` sidecar written after it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        parts = PurePosixPath(key).parts
        if not key or key.startswith("/") or any(p in ("..", ".") for p in parts):
            raise ArtifactError(f"invalid artifact key {key!r}")
        if any(p.endswith(".sha256") or p.startswith(".tmp-") for p in parts):
            raise ArtifactError(f"artifact key {key!r} uses a reserved name")
        return self.root.joinpath(*parts)

    def _write(self, key: str, fill: BinaryIO) -> ArtifactInfo:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := fill.read(_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        checksum = digest.hexdigest()
        atomic_write_text(path.with_name(path.name + ".sha256"), checksum)
        return ArtifactInfo(key, size, checksum)

    def put_file(self, key: str, source: Path) -> ArtifactInfo:
        """Copy ``source`` in under ``key``, atomically."""
        with source.open("rb") as f:
            return self._write(key, f)

    def put_bytes(self, key: str, data: bytes) -> ArtifactInfo:
        """Store ``data`` under ``key``, atomically."""
        return self._write(key, io.BytesIO(data))

    def open(self, key: str) -> BinaryIO:
        """Open ``key`` for reading."""
        path = self._path(key)
        if not path.is_file():
            raise ArtifactError(f"no artifact {key!r}")
        return path.open("rb")

    def info(self, key: str) -> ArtifactInfo:
        """Size and recorded sha256 of ``key``."""
        path = self._path(key)
        sidecar = path.with_name(path.name + ".sha256")
        if not path.is_file() or not sidecar.is_file():
            raise ArtifactError(f"no artifact {key!r}")
        return ArtifactInfo(key, path.stat().st_size, sidecar.read_text().strip())

    def verify(self, key: str) -> ArtifactInfo:
        """Re-hash ``key`` and raise if it no longer matches its recorded sha256."""
        info = self.info(key)
        actual = sha256_file(self._path(key))
        if actual != info.sha256:
            raise ArtifactError(f"artifact {key!r} is corrupt: sha256 {actual} != {info.sha256}")
        return info

    def exists(self, key: str) -> bool:
        """Whether ``key`` is stored completely (file and checksum)."""
        try:
            self.info(key)
        except ArtifactError:
            return False
        return True

    def list(self, prefix: str = "") -> Iterator[ArtifactInfo]:
        """Complete artifacts under ``prefix``, in key order."""
        for sidecar in sorted(self.root.rglob("*.sha256")):
            key = sidecar.relative_to(self.root).as_posix().removesuffix(".sha256")
            if key.startswith(prefix) and self.exists(key):
                yield self.info(key)

    def uri(self, key: str) -> str:
        """The URI an ``ArtifactRef`` carries for ``key`` (``file://...``)."""
        return self._path(key).resolve().as_uri()

    def key_of(self, uri: str) -> str:
        """The key of an artifact URI of this store; raises for any other URI."""
        root = self.root.resolve().as_uri() + "/"
        if not uri.startswith(root):
            raise ArtifactError(f"{uri!r} is not in this artifact store")
        key = uri.removeprefix(root)
        self._path(key)  # refuses keys that climb out
        return key

    def delete(self, key: str) -> None:
        """Remove ``key`` and its checksum."""
        path = self._path(key)
        path.with_name(path.name + ".sha256").unlink(missing_ok=True)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
