"""The YAML presets shipped inside the package (``flowopd/configs/``), by name.

A preset's name is its path under ``configs/`` without ``.yaml``: ``toy/grpo_geneval``,
``sd35m/grpo_ocr``. ``resolve_config`` turns what a user passes to ``--config`` into a
file: an existing file wins; otherwise the name (with or without ``.yaml``, with or
without a leading ``configs/``, so the paths the docs show work from any directory)
names a packaged preset. The config loader itself only ever sees file paths.

A file whose name starts with ``_`` (``toy/_grpo.yaml``) is not a preset but the shared
part that presets ``extends:``; it is shipped, not listed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PRESETS_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class Preset:
    """One packaged preset: ``name`` (``toy/grpo_geneval``), its file and one-line purpose."""

    name: str
    path: Path
    purpose: str


def purpose_of(path: Path) -> str:
    """The first sentence of the file's leading comment block ('' when it has none)."""
    words: list[str] = []
    for line in _leading_comment(path.read_text(encoding="utf-8")):
        text = line.lstrip("#").strip()
        words.append(text)
        if ". " in text or text.endswith((".", ":")):
            break
    sentence = " ".join(words).split(". ")[0]
    return sentence.rstrip(".:").strip()


def list_presets() -> list[Preset]:
    """Every packaged preset, sorted by name."""
    return [
        Preset(p.relative_to(PRESETS_DIR).with_suffix("").as_posix(), p, purpose_of(p))
        for p in sorted(PRESETS_DIR.rglob("*.yaml"))
        if not p.name.startswith("_")
    ]


def preset_text(path: Path) -> str:
    """The preset's YAML to copy and edit: the file itself, or, when it ``extends:`` a
    shared file, its leading comment over the merged, self-contained mapping."""
    import yaml

    text = path.read_text(encoding="utf-8")
    if "extends" not in (yaml.safe_load(text) or {}):
        return text

    from flowopd.config import read_config_file
    from flowopd.config.loader import _Dumper

    comment = _leading_comment(text)
    comment.append("# (its `extends:` chain merged in: a self-contained copy of the preset)")
    body = yaml.dump(read_config_file(path), Dumper=_Dumper, sort_keys=False, width=100)
    return "\n".join(comment) + "\n" + body


def _leading_comment(text: str) -> list[str]:
    """The lines of the file's leading ``#`` comment block."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


def preset_path(name: str) -> Path | None:
    """The packaged file of preset ``name`` (``toy/grpo_geneval``, ``.yaml`` and a leading
    ``configs/`` optional), or ``None`` when there is no such preset."""
    name = name.replace("\\", "/").removeprefix("./").removeprefix("configs/")
    for suffix in (".yaml", ".yml"):
        name = name.removesuffix(suffix)
    path = PRESETS_DIR / f"{name}.yaml"
    # no escaping the presets folder with '..'
    if ".." in Path(name).parts or not path.is_file():
        return None
    return path


def resolve_config(config: str | None) -> str | None:
    """``--config`` -> a file path: the file itself when it exists, else the packaged preset.

    ``None`` (no config: all defaults) stays ``None``. Raises a one-line ``UserError`` when
    ``config`` is neither a file nor a preset, naming the closest preset.
    """
    from flowopd.errors import UserError, closest

    if config is None or Path(config).is_file():
        return config
    path = preset_path(config)
    if path is not None:
        return str(path)
    names = [p.name for p in list_presets()]
    raise UserError(
        f"config file '{config}' not found, and no preset has that name"
        f"{closest(str(config).removesuffix('.yaml'), names)}; "
        "`flowopd presets` lists the packaged ones"
    )
