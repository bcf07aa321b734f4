"""``flowopd check ALGO --config FILE.yaml [key=value ...]``: validate a run before launch.

Takes the arguments of ``flowopd train`` and loads no model weights. Checks the config,
every prompt file and its format, the eval benchmarks and their prompt files, the rewards
and the weights they need, the teacher / anchor / init adapters and the layout over
``--gpus N`` processes; then prints the run plan (images per epoch, optimizer steps,
latent shape at model.resolution, trained steps, eval cadence) and the memory / time
estimate of ``flowopd estimate``. Exit status 0 when the run can start, 2 (one line on
stderr naming the problem and the fix) when it cannot.
"""

from __future__ import annotations

import argparse


def register(sub) -> None:
    from flowopd.cli.common import number
    from flowopd.cli.train import add_run_args
    from flowopd.perf import DEVICES

    p = sub.add_parser(
        "check",
        help="validate a training run (config, data, rewards, adapters) and print its plan",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    add_run_args(p)
    p.add_argument(
        "--gpus", type=number(int, 1), default=1, help="processes (one per GPU) to check for"
    )
    p.add_argument(
        "--gpu", default="h100", choices=[*DEVICES, "cpu"],
        help="device kind of the estimate (cpu: a GEMM measured now)",
    )  # fmt: skip
    p.add_argument(
        "--mfu",
        type=number(float, 0, 1, lo_open=True),
        default=None,
        help="assumed MFU of the estimate",
    )
    p.add_argument("--no-estimate", action="store_true", help="skip the memory/time estimate")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import time

    from flowopd.cli.estimate import check_device_args, estimate_for
    from flowopd.cli.train import load_run_config
    from flowopd.config import dump_config
    from flowopd.perf import format_estimate
    from flowopd.preflight import check_run

    t0 = time.perf_counter()
    check_device_args(args)
    cfg = load_run_config(args)
    if args.print_config:
        print(dump_config(cfg))
        return 0
    plan = check_run(args.algo, cfg, args.gpus)
    print(f"flowopd check {args.algo}: the run can start")
    print(plan.format())
    if args.no_estimate:
        pass
    elif not hasattr(cfg.sample, "group_size"):
        print(f"estimate: not available for '{args.algo}' (flowopd estimate costs RL epochs)")
    elif plan.latent_shape is None:
        print("estimate: skipped, the model's architecture is unknown (see the warning)")
    else:
        est = estimate_for(args.algo, cfg, args.gpu, args.gpus, args.mfu, plan.architecture)
        print(f"estimate ({args.gpu}, flowopd estimate):")
        print("\n".join("  " + line for line in format_estimate(est).splitlines()))
    print(f"checked in {time.perf_counter() - t0:.1f} s; no model weights loaded")
    return 0
