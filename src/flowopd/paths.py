"""Where the shipped assets live."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
EMBEDDED_MODEL = ASSETS / "embedded"  # the shipped base model (diffusers pipeline directory)


def default_model() -> str:
    """The shipped embedded base model, or a clear error when this install lacks it."""
    from flowopd.errors import UserError

    if not (EMBEDDED_MODEL / "model_index.json").is_file():
        raise UserError(
            f"the embedded model is missing from this install ({EMBEDDED_MODEL}); "
            "pass a model directory (--model DIR / model.path=DIR) or build it with "
            "`flowopd pretrain --out DIR`"
        )
    return str(EMBEDDED_MODEL)


def resolve_model_path(path: str | None) -> str:
    """``None`` or ``"embedded"`` -> the shipped model; anything else unchanged."""
    return default_model() if path in (None, "", "embedded") else path
