"""Prompt files in the published formats: GenEval metadata JSONL, OCR .txt, plain .txt."""

from __future__ import annotations

import json

import pytest

from flowopd.data.prompts import detect_format, read_prompt_file, unique_records
from flowopd.errors import UserError
from flowopd.rollouts import load_prompts

GENEVAL_LINE = (
    '{"tag": "position", "include": [{"class": "laptop", "count": 1}, {"class": "cow", '
    '"count": 1, "position": ["right of", 0]}], "prompt": "a photo of a cow right of a laptop"}'
)
OCR_LINES = [
    'A close-up of a sleek smartwatch on a wrist, the screen displaying "Step Goal Achieved" '
    "with a celebratory animation.",
    'An engraved silver ring with the inscription "Forever Yours" on a soft background.',
]
PLAIN_LINES = [
    "A pyramid made of falafel with a partial solar eclipse in the background.",
    "New York Skyline with 'Google Research Pizza Cafe' written with fireworks on the sky.",
]


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_published_files_parse_with_their_counts(shared_data):
    gen = read_prompt_file(shared_data / "geneval" / "test_metadata.jsonl")
    assert len(gen) == 2212 and len(unique_records(gen)) == 553  # 553 prompts x 4 lines
    assert {r["task"] for r in gen} == {"geneval"}
    assert gen[0]["include"][0] == {"class": "wine glass", "count": 2}
    ocr = read_prompt_file(shared_data / "ocr" / "test.txt")
    assert len(ocr) == 1018 and all(r["task"] == "ocr" for r in ocr)
    assert ocr[0]["target"] == "Spring Collection 2024"
    draw = read_prompt_file(shared_data / "drawbench" / "test.txt")
    assert len(draw) == 1000 and len(unique_records(draw)) == 200  # 200 prompts x 5 lines
    assert set(draw[0]) == {"prompt"}


def test_formats_are_told_apart_by_content(tmp_path):
    assert detect_format("x.jsonl", [GENEVAL_LINE]) == "geneval"
    assert detect_format("x.txt", ['{"prompt": "a cat"}']) == "jsonl"
    assert detect_format("x.txt", OCR_LINES) == "ocr"
    assert detect_format("x.txt", PLAIN_LINES) == "plain"
    # a plain file may quote a few prompts: it stays plain (1 of 3 lines quoted)
    assert detect_format("x.txt", [*PLAIN_LINES, 'a sign that says "hi"']) == "plain"
    recs = read_prompt_file(_write(tmp_path / "ocr.txt", OCR_LINES))
    assert [r["target"] for r in recs] == ["Step Goal Achieved", "Forever Yours"]
    recs = read_prompt_file(_write(tmp_path / "p.txt", ["", *PLAIN_LINES, "  "]))
    assert recs == [{"prompt": p} for p in PLAIN_LINES]  # blank lines skipped
    # a UTF-8 BOM (as some editors write) is not part of the first prompt
    (tmp_path / "bom.txt").write_bytes("\ufeffa red apple\n".encode())
    assert read_prompt_file(tmp_path / "bom.txt") == [{"prompt": "a red apple"}]


def test_a_mixed_jsonl_file_is_read_as_prompt_records(tmp_path):
    ocr = json.dumps({"prompt": OCR_LINES[1], "target": "Forever Yours", "task": "ocr"})
    path = _write(tmp_path / "mixed.jsonl", [GENEVAL_LINE, ocr])
    assert detect_format(path, path.read_text().splitlines()) == "jsonl"
    recs = read_prompt_file(path)
    assert [r.get("task") for r in recs] == [None, "ocr"] and recs[0]["include"][1][
        "class"
    ] == "cow"


def test_load_prompts_reads_every_format_and_labels_plain_ones(tmp_path):
    gen = _write(tmp_path / "g.jsonl", [GENEVAL_LINE])
    assert load_prompts(str(gen))[0]["task"] == "geneval"
    plain = _write(tmp_path / "pick.txt", PLAIN_LINES)
    assert "task" not in load_prompts(str(plain))[0]
    assert {r["task"] for r in load_prompts(str(plain), task="pickscore")} == {"pickscore"}
    # a file's own label wins over the dataset's reward name
    assert load_prompts(str(gen), task="pickscore")[0]["task"] == "geneval"


@pytest.mark.parametrize(
    "name, content, needles",
    [
        ("bad.jsonl", b'{"tag": "colors", "include": []}\n{oops\n', ["bad.jsonl:2", "not valid JSON"]),
        ("np.jsonl", b'{"tag": "colors", "include": [{"class": "cup", "count": 1}]}\n',
         ["np.jsonl:1", "'prompt' missing"]),
        ("bad2.jsonl", GENEVAL_LINE.encode() + b"\n{oops\n", ["bad2.jsonl:2", "not valid JSON"]),
        ("c.jsonl", b'{"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "teal"}],'
         b' "prompt": "a teal cup"}\n', ["c.jsonl:1", "teal"]),
        ("r.jsonl", b'{"text": "a cat"}\n', ["r.jsonl:1", "'prompt' string"]),
        ("e.jsonl", b'{"prompt": "  "}\n', ["e.jsonl:1", "empty 'prompt'"]),
        ("t.jsonl", b"a cat\n", ["t.jsonl:1", "rename it to .txt"]),
        ("ocr.txt", "\n".join([*OCR_LINES, OCR_LINES[0], "no target here"]).encode(),
         ["ocr.txt:4", "double quotes"]),
        ("empty.txt", b"\n  \n", ["empty.txt", "holds no prompts"]),
        ("bin.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00", ["bin.txt", "is a binary file"]),
        ("latin1.txt", b"a cat\na caf\xe9 sign\n", ["latin1.txt", "is not UTF-8 text", "line 2", "re-save"]),
    ],
)  # fmt: skip
def test_malformed_files_are_one_line_errors(tmp_path, name, content, needles):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError) as e:
        read_prompt_file(tmp_path / name)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


def test_missing_file_and_directory_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_prompt_file(tmp_path / "nope.txt")
    with pytest.raises(UserError, match="is a directory"):
        read_prompt_file(tmp_path)
    with pytest.raises(UserError, match="unknown prompt file format 'csv'"):
        read_prompt_file(tmp_path / "x.txt", format="csv")


def test_real_benchmark_readers_share_the_one_line_errors(tmp_path):
    from flowopd.rewards.geneval import read_geneval_metadata
    from flowopd.rewards.ocr import read_ocr_prompts

    (tmp_path / "bin.jsonl").write_bytes(b"\x00\x01\x02")
    with pytest.raises(UserError, match="binary file"):
        read_geneval_metadata(tmp_path / "bin.jsonl")
    (tmp_path / "l1.txt").write_bytes(b'a sign "caf\xe9"\n')
    with pytest.raises(UserError, match=r"l1.txt is not UTF-8 text \(byte 0xe9 on line 1\)"):
        read_ocr_prompts(tmp_path / "l1.txt")


def test_unique_records_keeps_first_occurrence_order():
    recs = [{"prompt": "b"}, {"prompt": "a"}, {"prompt": "b"}, {"prompt": "a", "task": "x"}]
    assert unique_records(recs) == [{"prompt": "b"}, {"prompt": "a"}, {"prompt": "a", "task": "x"}]
    assert json.dumps(recs[0]) == '{"prompt": "b"}'  # inputs untouched
