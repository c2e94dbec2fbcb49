"""Fine-tuning datasets: image + caption pairs from a folder or an uploaded zip, validated before use.

A dataset is a folder of images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``) each with a caption file of
the same stem (``cat.png`` + ``cat.txt``). Everything is bounded: the number of pairs, each image's
bytes and pixels, each caption's length; a zip is unpacked only after its directory says it fits
(file count, total unpacked bytes, compression ratio: no zip bombs) and only into the dataset's own
folder (no absolute names, no ``..``, no links). Every error says what to change.
"""

from __future__ import annotations

import io
import re
import shutil
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image

from glideserve.errors import InvalidRequestError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class DatasetLimits:
    """Bounds of one dataset (and of the zip it may come in)."""

    max_pairs: int = 2000
    min_pairs: int = 1
    max_image_bytes: int = 8 * 2**20
    max_image_side: int = 2048
    min_image_side: int = 8
    max_caption_chars: int = 1000
    max_zip_bytes: int = 256 * 2**20
    max_unpacked_bytes: int = 512 * 2**20
    max_zip_entries: int = 5000
    max_compression_ratio: float = 200.0


@dataclass(frozen=True)
class Pair:
    image: Path
    caption: str


def check_name(name: str, what: str, param: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidRequestError(f"{what} must be 1-64 characters of letters, digits, '.', '_' or '-', starting "
                                  f"with a letter or digit; got {name!r}", param)
    return name


def resolve_folder(data_dir: Path, name: str) -> Path:
    """``data_dir/name`` for a dataset named in a request; nothing outside ``data_dir`` is reachable."""
    check_name(name, "the dataset name", "training_file")
    folder = (data_dir / name).resolve()
    if folder.parent != data_dir.resolve() or not folder.is_dir():
        raise InvalidRequestError(f"no dataset {name!r} under the server's --data-dir; upload a zip or create the "
                                  "folder of image + caption pairs there", "training_file")
    return folder


def read_pairs(folder: Path, limits: DatasetLimits = DatasetLimits()) -> list[Pair]:
    """Every image + caption pair of ``folder``, each image opened and checked."""
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(images) > limits.max_pairs:
        raise InvalidRequestError(f"the dataset has {len(images)} images; at most {limits.max_pairs}",
                                  "training_file")
    pairs = []
    for image in images:
        if image.is_symlink() or not image.is_file():
            raise InvalidRequestError(f"{image.name} is not a regular file", "training_file")
        caption_file = image.with_suffix(".txt")
        if not caption_file.is_file() or caption_file.is_symlink():
            raise InvalidRequestError(f"{image.name} has no caption: add {caption_file.name} beside it",
                                      "training_file")
        check_image(image.read_bytes(), image.name, limits)
        pairs.append(Pair(image, check_caption(caption_file.read_bytes(), caption_file.name, limits)))
    if len(pairs) < limits.min_pairs:
        raise InvalidRequestError(f"the dataset has no image + caption pairs ({', '.join(IMAGE_SUFFIXES)} with a "
                                  ".txt of the same name)", "training_file")
    return pairs


def check_image(data: bytes, name: str, limits: DatasetLimits) -> None:
    if len(data) > limits.max_image_bytes:
        raise InvalidRequestError(f"{name} is {len(data)} bytes; at most {limits.max_image_bytes}", "training_file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            # The header's size, checked before any pixel is decoded (a small file can claim huge pixels).
            width, height = image.size
            if max(width, height) > limits.max_image_side or min(width, height) < limits.min_image_side:
                raise InvalidRequestError(f"{name} is {width}x{height}; sides must be {limits.min_image_side}.."
                                          f"{limits.max_image_side} pixels", "training_file")
            if image.format not in IMAGE_FORMATS:
                raise InvalidRequestError(f"{name} is {image.format}; use PNG, JPEG or WebP", "training_file")
            image.verify()
    except InvalidRequestError:
        raise
    except Exception as exc:  # PIL raises many kinds for a broken file
        raise InvalidRequestError(f"{name} is not a readable image: {exc}", "training_file") from None


def check_caption(data: bytes, name: str, limits: DatasetLimits) -> str:
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise InvalidRequestError(f"{name} is not UTF-8 text", "training_file") from None
    if not text:
        raise InvalidRequestError(f"{name} is empty; write the image's caption in it", "training_file")
    if len(text) > limits.max_caption_chars:
        raise InvalidRequestError(f"{name} has {len(text)} characters; at most {limits.max_caption_chars}",
                                  "training_file")
    if any(ord(c) < 32 and c not in "\t\n\r" for c in text):
        raise InvalidRequestError(f"{name} holds control characters", "training_file")
    return " ".join(text.split())


def _safe_member(info: zipfile.ZipInfo) -> PurePosixPath | None:
    """The member's relative path, None for a directory; refuses absolute names, '..', links and devices."""
    name = info.filename
    kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the zip did not record a Unix file type
    if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
        raise InvalidRequestError(f"the zip holds {name!r}, which is not a regular file or folder", "file")
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or ":" in name or not name or "\x00" in name:
        raise InvalidRequestError(f"the zip holds the unsafe name {name!r} (absolute, '..' or a drive)", "file")
    return None if info.is_dir() else path


def unpack_zip(data: bytes, destination: Path, limits: DatasetLimits = DatasetLimits()) -> Path:
    """Unpack an uploaded dataset zip into ``destination`` (which must not exist) after checking its
    directory; files in sub-folders are flattened by name (a clash is refused)."""
    if len(data) > limits.max_zip_bytes:
        raise InvalidRequestError(f"the zip is {len(data)} bytes; at most {limits.max_zip_bytes}", "file")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise InvalidRequestError(f"the upload is not a zip file: {exc}", "file") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > limits.max_zip_entries:
            raise InvalidRequestError(f"the zip has {len(infos)} entries; at most {limits.max_zip_entries}", "file")
        total = sum(info.file_size for info in infos)
        if total > limits.max_unpacked_bytes:
            raise InvalidRequestError(f"the zip unpacks to {total} bytes; at most {limits.max_unpacked_bytes}",
                                      "file")
        members: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            path = _safe_member(info)
            if path is None or path.name.startswith(".") or "__MACOSX" in path.parts:
                continue
            if info.compress_size and info.file_size / info.compress_size > limits.max_compression_ratio:
                raise InvalidRequestError(f"{path.name} is compressed {info.file_size / info.compress_size:.0f}:1; "
                                          "refusing a likely zip bomb", "file")
            if path.name in members:
                raise InvalidRequestError(f"the zip holds two files named {path.name}", "file")
            members[path.name] = info
        destination.mkdir(parents=True, exist_ok=False)
        try:
            _extract(archive, members, destination, limits)
        except BaseException:
            shutil.rmtree(destination, ignore_errors=True)
            raise
    return destination


def _extract(archive: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], destination: Path,
             limits: DatasetLimits) -> None:
    written = 0
    for name, info in members.items():
        try:
            with archive.open(info) as source:
                # Read at most what the directory declared (+1 to notice a lie): the directory is untrusted.
                content = source.read(info.file_size + 1)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
            raise InvalidRequestError(f"the zip is damaged at {name}: {exc}", "file") from None
        if len(content) != info.file_size:
            raise InvalidRequestError(f"{name} unpacks to more bytes than the zip declares", "file")
        written += len(content)
        if written > limits.max_unpacked_bytes:
            raise InvalidRequestError("the zip unpacks to more than it declares", "file")
        (destination / name).write_bytes(content)
