"""Typed run configs: the YAML loader and the config sections each algorithm composes.

``flowopd.config.loader`` turns nested dataclasses into YAML + ``key=value`` overrides
(and back); ``flowopd.config.sections`` holds the sections every algorithm shares;
``flowopd.config.grpo`` / ``opd`` / ``crd`` / ``sft`` / ``pipeline`` hold each run's
config. Only the loader's names are imported here, so ``import flowopd.config`` stays light.
"""

from flowopd.config.loader import (
    apply_overrides,
    config_from_dict,
    config_help,
    config_to_dict,
    dump_config,
    load_config,
    read_config_file,
    validate_config,
)

__all__ = [
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "validate_config",
    "dump_config",
    "config_to_dict",
    "config_help",
    "read_config_file",
]
