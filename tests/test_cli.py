"""The CLI end to end on a tiny model: images, timings JSON, and clean errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from glideserve.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_generate_one_prompt_writes_a_png(tiny_sd3_dir, tmp_path):
    out = tmp_path / "img.png"
    result = invoke("generate", "a red circle", "--model", tiny_sd3_dir, "--steps", 3, "--seed", 0,
                    "--guidance", 4.5, "--size", "32x24", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (32, 24)


def test_prompts_file_json_objects_and_numbering(tiny_sd3_dir, tmp_path):
    file = tmp_path / "prompts.json"
    file.write_text(json.dumps(["a cat", {"prompt": "a dog", "seed": 9, "steps": 2, "size": "16x16"}]))
    result = invoke("generate", "--prompts-file", file, "--model", tiny_sd3_dir, "--steps", 3, "--seed", 4,
                    "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "out" / "timings.json").read_text())
    assert [r["seed"] for r in records] == [4, 9] and [r["steps"] for r in records] == [3, 2]
    assert Image.open(tmp_path / "out" / "00001.png").size == (16, 16)
    assert all(r["total_s"] >= r["denoise_s"] for r in records)


def test_prompts_file_lines_match_single_runs(tiny_sd3_dir, tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("a cat\n\na dog\n")
    assert invoke("generate", "--prompts-file", file, "--model", tiny_sd3_dir, "--steps", 2, "--seed", 1,
                  "-o", tmp_path / "batch", "-q").exit_code == 0
    assert invoke("generate", "a dog", "--model", tiny_sd3_dir, "--steps", 2, "--seed", 2,
                  "-o", tmp_path / "single.png", "-q").exit_code == 0
    batched = np.asarray(Image.open(tmp_path / "batch" / "00001.png")).astype(int)
    single = np.asarray(Image.open(tmp_path / "single.png")).astype(int)
    assert np.abs(batched - single).max() <= 2


@pytest.mark.parametrize("args, message", [
    (["a", "--model", "{missing}"], "not found"),
    (["a", "--model", "{tmp}"], "not a diffusers model folder"),
    (["a", "--model", "{model}", "--size", "30x30"], "not a multiple"),
    (["a", "--model", "{model}", "--size", "big"], "size must look like"),
    (["", "--model", "{model}"], "must not be empty"),
    (["a", "--model", "{model}", "--steps", "500"], "1..200"),
    (["a", "--model", "{model}", "--sampler", "nope"], "unknown sampler"),
    (["a", "--model", "{model}", "--guidance", "-2"], "guidance_scale"),
    (["a", "--model", "{model}", "--seed", "-5"], "seed"),
    (["a", "--model", "{ckpt}"], "allow-unsafe-pickle"),
    (["--model", "{model}"], "either a PROMPT or --prompts-file"),
])
def test_bad_input_is_a_clean_error(tiny_sd3_dir, tmp_path, args, message):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not really a pickle")
    subs = {"{missing}": str(tmp_path / "nope"), "{tmp}": str(tmp_path), "{model}": tiny_sd3_dir,
            "{ckpt}": str(ckpt)}
    result = runner.invoke(app, ["generate", *[subs.get(a, a) for a in args]])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, (ValueError, TypeError))


def test_a_command_missing_an_extra_says_which_to_install(monkeypatch, capsys):
    import glideserve.cli as cli

    def needs(package: str):
        def command():
            raise ModuleNotFoundError(f"No module named {package!r}", name=package)
        return command

    monkeypatch.setattr(cli, "app", needs("scipy"))
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    assert stopped.value.code == 2 and "glideserve[serve]" in capsys.readouterr().err
    monkeypatch.setattr(cli, "app", needs("not_an_extra"))  # a real bug stays a traceback
    with pytest.raises(ModuleNotFoundError):
        cli.main()
