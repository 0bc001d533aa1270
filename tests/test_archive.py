"""A zip of a save_pretrained folder as a job's model (`model: {archive: ...}`), as a registry ships
a model too large for one package: split in chunks, joined and checked by sha256, unpacked once
into the cache. A classification job on it validates and runs; a zip without a model folder, or
damaged, is refused at validation naming it."""

from __future__ import annotations

import hashlib
import json
import struct
import zipfile
from pathlib import Path

import pytest
from conftest import check_refused, rt_job, run_cli, write_job


def zip_folder(folder: Path, archive: Path, top: str = "tiny-bert") -> Path:
    """The folder's files in a zip, below a top folder as `zip -r top.zip top/` writes them."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as opened:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                opened.write(file, f"{top}/{file.relative_to(folder)}")
    return archive


def split_in_chunks(archive: Path, parts: int) -> list[Path]:
    data = archive.read_bytes()
    size = -(-len(data) // parts)
    chunks = [archive.with_name(f"{archive.name}.part{i + 1}") for i in range(parts)]
    for i, chunk in enumerate(chunks):
        chunk.write_bytes(data[i * size : (i + 1) * size])
    return chunks


def archive_job(model: Path, archive_yaml: str) -> str:
    """The tiny BERT's rt-polarity job, its model the archive: field's YAML."""
    return rt_job(model, variants="[fp32-cpu]", n=16).replace(
        f"{{path: {model}}}", f"{{archive: {archive_yaml}}}"
    )


def test_a_zip_in_chunks_validates_and_runs(capsys, tmp_path, tiny_model, ray_temp_dir):
    archive = zip_folder(tiny_model, tmp_path / "tiny-bert.zip")
    chunks = split_in_chunks(archive, 2)
    sha256 = hashlib.sha256(archive.read_bytes()).hexdigest()
    archive.unlink()  # only the chunks, as the packages ship them
    chunked = f"{{chunks: [{chunks[0]}, {chunks[1]}], sha256: {sha256}}}"
    job = write_job(tmp_path / "jobs", archive_job(tiny_model, chunked))
    code, out, err = run_cli(capsys, "validate", job)
    assert code == 0, err
    assert f"archive:2 chunks from {chunks[0]}" in out, out
    results = tmp_path / "results"
    code, out, err = run_cli(
        capsys, "run", job, "--results", results, "--ray-temp-dir", ray_temp_dir
    )
    assert code == 0, err
    written = json.loads((results / "tiny-rt" / "fp32-cpu.json").read_text())
    assert written["status"] == "ok", written["error"]
    assert written["model"]["source"] == f"archive:2 chunks from {chunks[0]}"
    assert written["model"]["label_names"] == ["negative", "positive"]  # the zipped config's
    assert written["metrics"]["accuracy"] is not None


def test_a_zip_without_a_model_folder_is_refused(capsys, tmp_path):
    archive = tmp_path / "notes.zip"
    with zipfile.ZipFile(archive, "w") as opened:
        opened.writestr("model/README.md", "the weights are elsewhere\n")
    check_refused(
        capsys,
        tmp_path,
        archive_job(tmp_path / "unused", str(archive)),
        str(archive),
        "the zip must hold one model folder (with a config.json); found none",
    )


def damage_first_member(archive: Path) -> None:
    """The first member's compressed data made to start with deflate block type 3, which does not
    exist: zlib stops at it."""
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as opened:
        start = opened.infolist()[0].header_offset
    name_length, extra_length = struct.unpack("<HH", data[start + 26 : start + 30])
    data[start + 30 + name_length + extra_length] = 0xFF
    archive.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["cut short", "a member damaged"])
def test_a_damaged_zip_is_refused(capsys, tmp_path, tiny_model, damage):
    archive = zip_folder(tiny_model, tmp_path / "tiny-bert.zip")
    if damage == "cut short":  # its directory, at the end, is lost
        archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    else:
        damage_first_member(archive)
    check_refused(
        capsys,
        tmp_path,
        archive_job(tiny_model, str(archive)),
        "model.archive",
        str(archive),
        "cannot unpack the zip",
    )
