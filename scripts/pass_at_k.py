"""Per-category pass@1 / pass@k of a model on the toy GenEval test prompts.

How much a reward-driven method can gain by reweighting what the model already samples:
k images per prompt with the training sampler (default: 10-step SDE, noise 0.7, the
model's CFG); pass@1 is the mean strict score, pass@k the share of prompts with at least
one strictly correct image, "partial" the mean training reward (partial credit) and
"varied" the share of groups whose training reward varies (GRPO learns from those only).

    python scripts/pass_at_k.py                           # the embedded base
    python scripts/pass_at_k.py --lora runs/toy/grpo_geneval/lora --kind ode --steps 40

Measured on the embedded base (120 prompts x 8, SDE 10 steps, noise 0.7, CFG 3.0):
pass@1 0.289, pass@8 0.842 on the world v1 base (docs/EXPERIMENTS.md, 2026-11); the world v2
base: 0.503 / 0.817 (docs/EMBEDDED_MODEL.md).
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    from flowopd.cli import OneLineParser
    from flowopd.cli.common import number

    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded", help="model dir (default: embedded)")
    p.add_argument("--lora", default=None, help="adapter dir to evaluate (default: none)")
    p.add_argument("--kind", default="sde", choices=["sde", "cps", "ode"])
    p.add_argument("--steps", type=number(int, 1), default=10)
    p.add_argument(
        "--noise", type=number(float, 0, lo_open=True), default=0.7, help="SDE noise level"
    )
    p.add_argument(
        "--guidance", type=number(float, 0), default=None, help="CFG (default: the model's)"
    )
    p.add_argument("--n", type=number(int, 1), default=120, help="toy-GenEval test prompts")
    p.add_argument("--k", type=number(int, 1), default=8, help="images per prompt")
    p.add_argument("--seed", type=number(int, 0), default=7)
    args = p.parse_args(argv)
    if args.k < 2 or args.n < 1 or args.steps < 1:
        p.error("--k must be >= 2 (pass@k compares images of a prompt), --n and --steps >= 1")

    import torch

    from flowopd.engine.logging import quiet_libraries
    from flowopd.eval.benchmarks import benchmark_records
    from flowopd.models import load_model
    from flowopd.paths import resolve_model_path
    from flowopd.rewards.base import get_reward
    from flowopd.rollouts import collect_rollouts
    from flowopd.sampling import SamplerSpec

    quiet_libraries()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(resolve_model_path(args.model), device=device, dtype="float32")
    if args.lora:
        model.load_adapter(args.lora, "lora0")
        model.set_adapter("lora0")
    cfg = args.guidance if args.guidance is not None else model.default_guidance_scale
    recs = benchmark_records("toy-geneval", args.n)
    spec = SamplerSpec(args.steps, kind=args.kind, noise_level=args.noise, guidance_scale=cfg)
    t0 = time.time()
    ro = collect_rollouts(
        model,
        recs,
        0,
        args.k,
        spec,
        batch_size=64,
        seed=args.seed,
        epoch=0,
        record=False,
        reward=get_reward("toy_geneval_strict"),
    )
    partial = get_reward("toy_geneval")(ro.images, ro.prompts, ro.records).view(len(recs), -1)
    strict = ro.rewards.view(len(recs), -1)
    noise = "" if args.kind == "ode" else f", noise {args.noise}"
    print(f"{args.kind}, {args.steps} steps{noise}, CFG {cfg}, "
          f"{len(recs)} prompts x {args.k} ({time.time() - t0:.0f} s)")  # fmt: skip
    print(
        f"{'category':14s} {'pass@1':>7s} {'pass@' + str(args.k):>7s} {'partial':>8s} {'varied':>7s}"
    )
    p1, pk = [], []
    for tag in sorted({r["tag"] for r in recs}):
        idx = [i for i, r in enumerate(recs) if r["tag"] == tag]
        s, q = strict[idx], partial[idx]
        p1.append(float(s.mean()))
        pk.append(float((s.amax(1) > 0).float().mean()))
        varied = float((q.std(1) > 0).float().mean())
        print(f"{tag:14s} {p1[-1]:7.3f} {pk[-1]:7.3f} {float(q.mean()):8.3f} {varied:7.3f}")
    print(f"{'overall':14s} {sum(p1) / len(p1):7.3f} {sum(pk) / len(pk):7.3f}")
    return 0


if __name__ == "__main__":
    from flowopd.cli.common import run_script

    run_script(main)
