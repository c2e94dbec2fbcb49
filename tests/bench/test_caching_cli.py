"""`glideserve bench caching` end to end on the bundled tiny model: valid JSON, table and grid."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from glideserve.cli import app


def test_caching_table_writes_valid_json_with_none_as_the_exact_reference(tmp_path):
    result = CliRunner().invoke(app, [
        "bench", "caching", "--model", "glide-tiny", "--steps", "3", "--captions", "2", "--seeds", "1",
        "--latent-aware", "off", "--alone", "1", "--flop-images", "1", "--grid-captions", "2",
        "--policy", "glideserve:1", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "caching.json").read_text())  # strict JSON: no Infinity for an exact row
    rows = {r["policy"]: r for r in data["rows"]}
    assert rows["none"]["ssim"] == 1.0 and rows["none"]["psnr"] is None
    assert rows["glideserve:1"]["cached_steps"] == 1.0 and rows["glideserve:1"]["full_steps"] == 2.0
    assert rows["glideserve:1"]["transformer_gflops_per_image"] < rows["none"]["transformer_gflops_per_image"]
    assert "| 3 | glideserve:1 | no |" in (tmp_path / "caching.md").read_text()
    assert (tmp_path / "grid-3steps.png").is_file()
