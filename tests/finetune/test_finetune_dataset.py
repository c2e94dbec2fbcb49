"""Dataset validation: folders of pairs, and zips that try traversal, links, bombs, lies and bad images."""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from glideserve.errors import InvalidRequestError
from glideserve.finetune.dataset import DatasetLimits, read_pairs, resolve_folder, unpack_zip


def _png(side: int = 16, color=(255, 105, 180)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), color, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _zip(entries: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_a_good_zip_unpacks_flat_and_reads_as_pairs(tmp_path):
    data = _zip({"set/a.png": _png(), "set/a.txt": b"a pink circle\n", "b.png": _png(), "b.txt": b"a  pink square",
                 "__MACOSX/._a.png": b"x"})
    folder = unpack_zip(data, tmp_path / "ds")
    pairs = read_pairs(folder)
    assert [(p.image.name, p.caption) for p in pairs] == [("a.png", "a pink circle"), ("b.png", "a pink square")]


@pytest.mark.parametrize("name", ["../evil.png", "/abs.png", "a/../../evil.txt", "C:evil.png"])
def test_zip_names_cannot_leave_the_dataset(tmp_path, name):
    with pytest.raises(InvalidRequestError, match="unsafe name"):
        unpack_zip(_zip({name: _png()}), tmp_path / "ds")
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "ds").exists()


def test_zip_links_are_refused(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo("link.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, "/etc/passwd")
    with pytest.raises(InvalidRequestError, match="not a regular file"):
        unpack_zip(buffer.getvalue(), tmp_path / "ds")


def test_zip_bombs_and_oversize_zips_are_refused_before_unpacking(tmp_path):
    bomb = _zip({"a.png": b"\0" * (4 * 2**20), "a.txt": b"x"})
    with pytest.raises(InvalidRequestError, match="zip bomb"):
        unpack_zip(bomb, tmp_path / "one")
    with pytest.raises(InvalidRequestError, match="unpacks to"):
        unpack_zip(bomb, tmp_path / "two", DatasetLimits(max_unpacked_bytes=2**20))
    with pytest.raises(InvalidRequestError, match="at most 100"):
        unpack_zip(bomb, tmp_path / "three", DatasetLimits(max_zip_bytes=100))
    many = _zip({f"{i}.txt": b"x" for i in range(20)})
    with pytest.raises(InvalidRequestError, match="entries"):
        unpack_zip(many, tmp_path / "four", DatasetLimits(max_zip_entries=10))
    with pytest.raises(InvalidRequestError, match="not a zip"):
        unpack_zip(b"PK\x03\x04 not really", tmp_path / "five")
    assert not any((tmp_path / n).exists() for n in ("one", "two", "three", "four", "five"))


def test_a_zip_whose_directory_lies_about_sizes_is_refused(tmp_path):
    data = bytearray(_zip({"a.txt": b"x" * 1000}, compression=zipfile.ZIP_STORED))
    # Shrink the declared size in the central directory (signature PK\x01\x02, size at offset 24).
    central = data.rfind(b"PK\x01\x02")
    data[central + 24:central + 28] = (10).to_bytes(4, "little")
    with pytest.raises(InvalidRequestError, match="damaged|more bytes than the zip declares"):
        unpack_zip(bytes(data), tmp_path / "ds")


@pytest.mark.parametrize("files, message", [
    ({"a.png": b"not an image", "a.txt": b"x"}, "not a readable image"),
    ({"a.png": _png(side=4), "a.txt": b"x"}, "sides must be"),
    ({"a.png": _png(), "a.txt": b""}, "empty"),
    ({"a.png": _png(), "a.txt": "\u00e9".encode("latin-1")}, "not UTF-8"),
    ({"a.png": _png(), "a.txt": b"x" * 2000}, "characters; at most"),
    ({"a.png": _png()}, "has no caption"),
    ({"a.txt": b"only a caption"}, "no image"),
])
def test_bad_pairs_are_named(tmp_path, files, message):
    folder = tmp_path / "ds"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    with pytest.raises(InvalidRequestError, match=message):
        read_pairs(folder)


def test_a_gif_or_a_huge_header_is_refused(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, format="GIF")
    (folder / "a.png").write_bytes(buffer.getvalue())
    (folder / "a.txt").write_text("x")
    with pytest.raises(InvalidRequestError, match="GIF"):
        read_pairs(folder)
    with pytest.raises(InvalidRequestError, match="sides must be"):
        read_pairs(folder, DatasetLimits(max_image_side=8))


def test_dataset_names_stay_inside_the_data_dir(tmp_path):
    (tmp_path / "ok").mkdir()
    assert resolve_folder(tmp_path, "ok") == (tmp_path / "ok").resolve()
    for bad in ("../etc", "/etc", ".jobs", "a/b", ""):
        with pytest.raises(InvalidRequestError):
            resolve_folder(tmp_path, bad)
    (tmp_path / "link").symlink_to(Path("/tmp"))
    with pytest.raises(InvalidRequestError):
        resolve_folder(tmp_path, "link")
