"""Shared fixtures: tiny random models built offline, saved and loaded back for real."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Servers started by tests measure latency profiles; keep their cache out of the user's.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="glideserve-test-cache-")


def _save(pipe, path):
    pipe.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    from glideserve.models.build import build_sd3_pipeline

    return _save(build_sd3_pipeline(), tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory):
    from glideserve.models.build import build_unet_pipeline

    return _save(build_unet_pipeline(), tmp_path_factory.mktemp("tiny-sd15"))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    from glideserve.models.build import UNetDims, build_unet_pipeline

    return _save(build_unet_pipeline(UNetDims(xl=True)), tmp_path_factory.mktemp("tiny-sdxl"))
