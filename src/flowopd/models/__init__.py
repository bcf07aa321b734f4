"""Models behind one protocol (``FlowModel``); one file per backend."""

from __future__ import annotations

from typing import Any

from flowopd.errors import unknown
from flowopd.models.base import BASE, Cond, FlowModel

BACKENDS = {"sd3": "flowopd.models.sd3:SD3Model", "flux": "flowopd.models.flux:FluxModel"}


def load_model(path: str, backend: str = "sd3", **kwargs: Any) -> FlowModel:
    """Load a model by backend name: ``load_model("stabilityai/stable-diffusion-3.5-medium")``."""
    import importlib

    if backend not in BACKENDS:
        raise unknown("model backend", backend, BACKENDS)
    mod, cls = BACKENDS[backend].split(":")
    return getattr(importlib.import_module(mod), cls).from_pretrained(path, **kwargs)


__all__ = ["BASE", "BACKENDS", "Cond", "FlowModel", "load_model"]
