"""A prepared model travels to other nodes as a tar; unpacking it works on every Python that
requires-python admits and writes nothing but the archive's plain files into the cache entry."""

from __future__ import annotations

import io
import tarfile

import pytest

from runner import model_cache


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, data in members:
            info.size = len(data or b"")
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def test_a_folder_round_trips_where_extractall_has_no_filter(tmp_path, monkeypatch):
    """Python 3.11.0-3.11.3 (Debian 12's is 3.11.2) have no filter= argument: unpacking must not
    need it."""

    def old_extractall(self, path=".", members=None, *, numeric_owner=False):
        raise AssertionError("unpacking must not rely on extractall")

    monkeypatch.setattr(tarfile.TarFile, "extractall", old_extractall)
    source = tmp_path / "model"
    source.mkdir()
    (source / "config.json").write_text('{"model_type": "bert"}')
    (source / "model.safetensors").write_bytes(bytes(range(256)) * 40)
    (source / model_cache.MARKER).write_text('{"key": "k"}')

    unpacked = model_cache.unpack_archive("k-roundtrip", model_cache.archive_folder(source))

    assert sorted(p.name for p in unpacked.iterdir()) == sorted(p.name for p in source.iterdir())
    assert (unpacked / "model.safetensors").read_bytes() == (
        source / "model.safetensors"
    ).read_bytes()


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def _folder(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info, None


@pytest.mark.parametrize(
    "member",
    [
        _file("../escaped"),
        _file("/etc/escaped"),
        _file("sub/dir/file"),
        _link("link", "/etc/passwd", tarfile.SYMTYPE),
        _link("hard", "/etc/passwd", tarfile.LNKTYPE),
        _folder("folder"),
    ],
    ids=["dot-dot", "absolute", "nested", "symlink", "hardlink", "folder"],
)
def test_anything_but_a_plain_top_level_file_is_refused(tmp_path, member):
    target = tmp_path / "entry"
    target.mkdir()
    with pytest.raises(ValueError, match="only plain files at its top level"):
        model_cache.extract_flat(_tar(_file("config.json"), member), target)
    assert not (tmp_path / "escaped").exists()
    assert [p.name for p in target.iterdir()] == ["config.json"]
