"""`flowopd sample` and `flowopd eval` as a user runs them (tiny pixel model, subprocess)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tests.recipes.conftest import run_cli


def test_sample_writes_pngs(tmp_path, tiny_pixel_dir):
    out = tmp_path / "s"
    proc = run_cli("sample", "--model", str(tiny_pixel_dir), "--prompt", "a photo of a red circle",
                   "--prompt", 'a sign that says "47"', "--n", "2", "--steps", "3", "--out", str(out))  # fmt: skip
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 4 and proc.stdout.count(".png") == 4
    assert Image.open(pngs[0]).size == (32, 32)


def test_sample_errors_are_one_line(tmp_path, tiny_pixel_dir):
    for args, needle in [
        (["--model", str(tmp_path / "nope")], "not found"),
        (["--model", str(tiny_pixel_dir), "--lora", str(tmp_path)], "LoRA"),
        (["--model", str(tiny_pixel_dir), "--steps", "0"], "--steps"),
    ]:
        proc = run_cli(
            "sample", *args, "--prompt", "a circle", "--out", str(tmp_path / "o"), check=False
        )
        assert proc.returncode == 2, proc.stderr
        assert needle in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    proc = run_cli(
        "sample",
        "--model",
        str(tiny_pixel_dir),
        "--prompt",
        " ",
        "--out",
        str(tmp_path),
        check=False,
    )
    assert proc.returncode == 2 and "empty --prompt" in proc.stderr


def test_eval_writes_metrics_schema_and_is_deterministic(tmp_path, tiny_pixel_dir):
    args = ["eval", "--model", str(tiny_pixel_dir), "--benchmark", "toy-geneval,toy-ocr,toy-quality",
            "--n", "12", "--steps", "3"]  # fmt: skip
    run_cli(*args, "--out", str(tmp_path / "a"))
    run_cli(*args, "--out", str(tmp_path / "b"), "--batch-size", "5")
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    # same seed -> same numbers, whatever the batch size (up to float rounding: batched
    # matrix products may sum in another order at another batch size)
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-6) for k in a)
    assert set(a) == {"toy-geneval", "toy-ocr", "toy-quality"}
    cats = {
        "single_object",
        "two_object",
        "counting",
        "colors",
        "position",
        "color_attr",
        "overall",
        "overall_se",
    }
    assert set(a["toy-geneval"]) <= cats and "overall" in a["toy-geneval"]
    assert set(a["toy-ocr"]) == {"overall", "overall_se"}
    # scores in [0, 1]: s <= 0.5 sqrt(n / (n - 1))
    assert 0 <= a["toy-ocr"]["overall_se"] <= 0.53 / 12**0.5
    assert (tmp_path / "a" / "grid.png").is_file()


def test_eval_unknown_benchmark(tmp_path, tiny_pixel_dir):
    proc = run_cli("eval", "--model", str(tiny_pixel_dir), "--benchmark", "toy-genevl",
                   "--out", str(tmp_path), check=False)  # fmt: skip
    assert proc.returncode == 2 and "did you mean 'toy-geneval'" in proc.stderr


def test_real_benchmark_prompt_files_are_read(shared_data):
    from flowopd.eval.benchmarks import benchmark_records, parse_benchmarks

    gen = f"geneval={shared_data / 'geneval' / 'test_metadata.jsonl'}"
    ocr = f"ocr={shared_data / 'ocr' / 'test.txt'}"
    assert parse_benchmarks(f"{gen},{ocr}") == [gen, ocr]
    recs = benchmark_records(gen, None)  # unique prompts: the file repeats each one 4 times
    assert len(recs) == 553 and {r["tag"] for r in recs} == {
        "single_object", "two_object", "counting", "colors", "position", "color_attr"
    }  # fmt: skip
    assert len(benchmark_records(ocr, None)) == 1018
    assert len(benchmark_records(ocr, 10)) == 10


def test_sample_warns_once_per_prompt_outside_the_embedded_world(tmp_path):
    """The embedded model knows only the world's captions; other prompts get one warning
    line each (the image is still written), prompts of its grammar none."""
    prompts = [
        "a photo of a dog",
        "a photo of a red circle and a blue square",
        'a sign that says "47"',
    ]
    args = [a for p in [*prompts, prompts[0]] for a in ("--prompt", p)]
    proc = run_cli("sample", *args, "--steps", "1", "--out", str(tmp_path))
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "'a photo of a dog' is outside" in warnings[0], proc.stderr
    assert len(list(tmp_path.glob("*.png"))) == 4
