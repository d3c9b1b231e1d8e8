"""Checkpoint manifests (`jaxbp.app.manifest`) on plain folders; the end-to-end checks of
damaged checkpoints on resume and eval are in test_train.py."""
from __future__ import annotations

import json
import os

from jaxbp.app import manifest


def make_folder(root) -> str:
    folder = root / "step"
    (folder / "params" / "d").mkdir(parents=True)
    (folder / "params" / "d" / "data").write_bytes(bytes(range(256)) * 8)
    (folder / "meta.json").write_text('{"epoch": 1}')
    return str(folder)


def flip_byte(path: str, offset: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 1]))


def test_a_written_manifest_lists_every_file_and_verifies(tmp_path):
    folder = make_folder(tmp_path)
    assert not manifest.has_manifest(folder)
    assert manifest.problem(folder) == "missing manifest"
    manifest.write(folder)
    assert manifest.has_manifest(folder)
    with open(os.path.join(folder, manifest.MANIFEST_FILE)) as f:
        assert sorted(json.load(f)["sha256"]) == ["meta.json", "params/d/data"]
    assert manifest.problem(folder) is None
    (tmp_path / "step" / "added").write_text("not listed, not read by restore")
    assert manifest.problem(folder) is None


def test_a_flipped_byte_a_missing_file_and_a_bad_manifest_are_named(tmp_path):
    folder = make_folder(tmp_path)
    manifest.write(folder)
    data = os.path.join(folder, "params", "d", "data")
    flip_byte(data, 1000)
    assert manifest.problem(folder) == "checksum mismatch in params/d/data"
    flip_byte(data, 1000)
    assert manifest.problem(folder) is None
    os.remove(os.path.join(folder, "meta.json"))
    assert manifest.problem(folder) == "missing file meta.json"
    flip_byte(os.path.join(folder, manifest.MANIFEST_FILE))
    assert manifest.problem(folder).startswith(f"unreadable manifest {manifest.MANIFEST_FILE}")
