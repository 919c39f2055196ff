"""Writing files so that a kill at any moment leaves either the old file or the new one, never half of one; and
with the permissions every other file of the run gets. Reading and appending the JSON-lines files runs append to."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import psutil


@contextlib.contextmanager
def replaced_atomically(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; when the block ends without an error it is renamed over
    `path` (atomic on POSIX: a reader sees the whole old file or the whole new one), otherwise removed."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporaries of replaced_atomically in `folder` whose writer is gone (a run, or its background plot,
    killed mid-write); the ones removed. One whose process still runs is left to it."""
    removed = []
    for temporary in Path(folder).glob(".*.tmp*"):
        pid = temporary.name.rpartition(".tmp")[2]
        if pid.isdigit() and temporary.is_file() and not psutil.pid_exists(int(pid)):
            temporary.unlink(missing_ok=True)
            removed.append(temporary)
    return removed


def write_atomically(path: str | Path, content: str | bytes) -> None:
    """Write `content` to `path` through replaced_atomically."""
    with replaced_atomically(path) as temporary:
        if isinstance(content, bytes):
            temporary.write_bytes(content)
        else:
            temporary.write_text(content)


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file the runs append to (metrics.jsonl, attempts.jsonl); none if it is missing. A
    line cut off by a kill, or still being written, is left out."""
    rows = []
    with contextlib.suppress(FileNotFoundError), open(path) as lines:
        for line in lines:
            with contextlib.suppress(ValueError):
                row = json.loads(line)
                if isinstance(row, dict):
                    rows.append(row)
    return rows


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one row as one line, written at once and flushed to disk: a run killed a moment later keeps it."""
    line = (json.dumps(row) + "\n").encode()
    with open(path, "ab+") as file:
        if file.seek(0, os.SEEK_END):  # a last line cut off by a kill must not swallow this one
            file.seek(-1, os.SEEK_END)
            if file.read(1) != b"\n":
                line = b"\n" + line
        file.write(line)
        file.flush()
        os.fsync(file.fileno())


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename into it, say) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def follow_umask(path: str | Path) -> None:
    """Give a file the permissions open() would have given it (0666 less the umask). safetensors creates its files
    0600, readable by their owner only: on a shared filesystem a teammate or an evaluation job under another
    account could not load the model beside JSON files that anyone may read."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    try:  # Linux says it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere reading it means setting it: set it straight back
    os.umask(mask)
    return mask
