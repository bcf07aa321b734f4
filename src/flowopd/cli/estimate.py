"""``flowopd estimate --config FILE.yaml [--gpu h100] [--gpus N]``: memory and time before launch.

Counts FLOPs and bytes from the model's architecture (``transformer/config.json`` of a
local pipeline directory, or a known hub id such as stabilityai/stable-diffusion-3.5-medium
without downloading) and the run config; nothing is loaded onto a device. See
``flowopd.perf.estimate_run`` for the formulas and docs/PERFORMANCE.md for how the
numbers compare with measurements.
"""

from __future__ import annotations

import argparse


def register(sub) -> None:
    from flowopd.cli.common import number
    from flowopd.perf import DEFAULT_MFU, DEVICES, GPU_MFU

    kinds = [*DEVICES, "cpu"]
    p = sub.add_parser(
        "estimate",
        help="estimate peak memory per GPU and time per epoch of a training config",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    p.add_argument("--config", required=True, help="training YAML or preset (flowopd presets)")
    p.add_argument(
        "--algo", default=None,
        help="recipe whose config this is (default: the config's method section, else grpo)",
    )  # fmt: skip
    p.add_argument(
        "--gpu", default="h100", choices=kinds,
        help="device kind: peak TFLOP/s and memory from the datasheet; cpu: a GEMM measured now",
    )  # fmt: skip
    p.add_argument(
        "--gpus", type=number(int, 1), default=1, help="number of processes (one per GPU)"
    )
    p.add_argument(
        "--mfu", type=number(float, 0, 1, lo_open=True), default=None,
        help=f"assumed achieved fraction of the peak (default: {GPU_MFU} on a GPU, as "
        f"measured on an H100; {DEFAULT_MFU} of the measured GEMM rate on cpu)",
    )  # fmt: skip
    p.add_argument("--json", default=None, help="also write the estimate as JSON here")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.batch_size=4")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from flowopd.algos import ALGOS, algo_of_sections, load
    from flowopd.config import load_config
    from flowopd.errors import unknown
    from flowopd.perf import format_estimate
    from flowopd.presets import resolve_config

    check_device_args(args)
    path = resolve_config(args.config)
    args.algo = args.algo or algo_of_sections(_top_level_keys(path))
    if args.algo not in ALGOS:
        raise unknown("algorithm", args.algo, ALGOS)
    cfg = load_config(load(ALGOS[args.algo][0]), path, list(args.overrides), validate=False)
    # the checks that need no data files (an estimate runs before the data is in place)
    for section in ("model", "sample", "train"):
        hook = getattr(getattr(cfg, section, None), "validate", None)
        if callable(hook):
            hook()
    if hasattr(cfg, "check_distributed"):
        cfg.check_distributed(args.gpus)
    est = estimate_for(args.algo, cfg, args.gpu, args.gpus, args.mfu)
    print(format_estimate(est))
    if args.json:
        Path(args.json).write_text(json.dumps(est.to_dict(), indent=2) + "\n")
    return 0


def _top_level_keys(path: str) -> list[str]:
    """The top-level keys of the config file ``path``, its ``extends:`` chain included."""
    from flowopd.config import read_config_file

    return list(read_config_file(path))


def check_device_args(args: argparse.Namespace) -> None:
    """``--gpus`` >= 1 and ``--mfu`` in (0, 1] (NaN and inf rejected)."""
    import math

    from flowopd.errors import UserError

    if args.gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {args.gpus}")
    if args.mfu is not None and not (math.isfinite(args.mfu) and 0 < args.mfu <= 1):
        raise UserError(f"--mfu must be in (0, 1], got {args.mfu}")


def estimate_for(algo: str, cfg, gpu: str, gpus: int, mfu: float | None, architecture=None):
    """``perf.estimate_run`` of ``algo``'s config; ``architecture`` (arch, shape) when
    already read (``flowopd check``), else from model.path."""
    from flowopd.perf import estimate_run

    arch, shape = architecture or (None, None)
    est = estimate_run(cfg, gpu, gpus, mfu=mfu, arch=arch, shape=shape)
    est.notes.insert(0, f"'{algo}': {est.notes.pop(0)}")
    return est
