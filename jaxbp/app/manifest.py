"""SHA-256 manifests of folders: which bytes a folder held when it was written.

Orbax does not verify array data on restore (a flipped byte in a params file comes back
as a silently different number), so a checkpoint's folder gets a manifest of its own.
`write` lists every file under the folder with its SHA-256 and writes the list atomically;
`problem` says what, if anything, no longer matches. Files added to the folder after the
manifest was written are not reported: only the listed ones are what restore reads.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

from jaxbp.app.report import write_atomic

MANIFEST_FILE = "sha256.json"
_CHUNK = 1 << 20


def digest(path: str) -> str:
    """The hex SHA-256 of a file's bytes, read in chunks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            sha.update(chunk)
    return sha.hexdigest()


def listed_files(folder: str) -> list[str]:
    """Every file under `folder` but the manifest (and its temporary), as sorted relative
    POSIX paths."""
    skip = {MANIFEST_FILE, f"{MANIFEST_FILE}.tmp"}
    paths = []
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel not in skip:
                paths.append(rel.replace(os.sep, "/"))
    return sorted(paths)


def write(folder: str) -> None:
    """Writes `folder`'s manifest: {"sha256": {relative path: hex digest}}."""
    sums = {rel: digest(os.path.join(folder, rel)) for rel in listed_files(folder)}
    write_atomic(os.path.join(folder, MANIFEST_FILE),
                 json.dumps({"sha256": sums}, indent=1, sort_keys=True) + "\n")


def has_manifest(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MANIFEST_FILE))


def problem(folder: str) -> Optional[str]:
    """None when every file the manifest lists is there with its bytes; else what is wrong
    ("missing manifest", "unreadable manifest: ...", "missing file X", "unreadable file X:
    ...", "checksum mismatch in X"), naming the first bad file in sorted order."""
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.isfile(path):
        return "missing manifest"
    try:
        with open(path, encoding="utf-8") as f:
            sums = json.load(f)["sha256"]
        items = sorted(sums.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"unreadable manifest {MANIFEST_FILE}: {type(exc).__name__}"
    for rel, expected in items:
        file = os.path.join(folder, *rel.split("/"))
        if not os.path.isfile(file):
            return f"missing file {rel}"
        try:
            actual = digest(file)
        except OSError as exc:
            return f"unreadable file {rel}: {exc.strerror or exc}"
        if actual != expected:
            return f"checksum mismatch in {rel}"
    return None
