"""``models.adapters.atomic_dir``: the one write-to-a-temp-dir-then-rename helper."""

from __future__ import annotations

import pytest

from flowopd.models.adapters import atomic_dir


def test_atomic_dir_replaces_the_old_directory(tmp_path):
    target = tmp_path / "sub" / "lora"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (target / "a.txt").read_text() == "1"
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in target.parent.iterdir()] == ["lora"]  # no temp dir left


def test_atomic_dir_keeps_the_old_directory_on_error(tmp_path):
    target = tmp_path / "lora"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("writer failed")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["lora"]
