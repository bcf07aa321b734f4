"""How noisy is the GRPO gradient? Per-group signal-to-noise ratio, per trained step.

Samples ``--prompts`` groups of G images with the training sampler, scores them, computes
group advantages, and takes each group's gradient of the GRPO loss at ratio 1
(``-mean_i A_i * log p_i``, one SDE step at a time) with respect to the LoRA weights. The
per-group SNR ``s = ||E g||^2 / tr Cov g`` (``flowopd.eval.gradient_snr``) says how many
groups one update needs before its signal equals its noise (1 / s), whatever the learning
rate. ``--fm`` adds the advantage-weighted flow-matching estimator (AWM / the forward-
process family CRD belongs to) on the same clean samples: ``mean_i A_i * ||v(x_s) - (eps -
x_0)||^2`` at each of the sampler's sigmas, conditional velocity.

It keeps every group's gradient in memory, (groups x steps x LoRA parameters) float32:
0.65 GB per estimator for the embedded model at 128 groups; use fewer groups on big models.

    python scripts/grad_snr.py                     # toy-GenEval, full 10-step SDE, 128 groups
    python scripts/grad_snr.py --task ocr --fm --json runs/snr_ocr.json

Measured on the embedded base (128 groups x 8, noise 0.7, CFG 3; 5 min on 1 thread), toy-GenEval:
per-step SNR -0.0005..0.0016, each +- ~0.002 (indistinguishable from 0), flow matching 0.0040
at best; a positive control (``--reward redness``) reads 0.01 (log-prob) and 0.27 (flow
matching), on the world v1 base. Figures and their reading: docs/EXPERIMENTS.md (2026-11).
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
    p.add_argument("--lora", default=None, help="adapter to start from (default: a fresh one)")
    p.add_argument("--task", default="geneval", choices=["geneval", "ocr"])
    p.add_argument("--reward", default=None,
                   help="a registered reward instead of the task's, or 'redness' (mean R - "
                        "(G + B) / 2: a dense positive control)")  # fmt: skip
    p.add_argument(
        "--prompts", type=number(int, 1), default=128, help="groups (independent samples)"
    )
    p.add_argument("--group-size", type=number(int, 2), default=8)
    p.add_argument(
        "--noise", type=number(float, 0, lo_open=True), default=0.7, help="SDE noise level"
    )
    p.add_argument(
        "--guidance", type=number(float, 0), default=None, help="CFG (default: the model's)"
    )
    p.add_argument("--window", default="", help="stochastic steps 'start,end' (default: all)")
    p.add_argument("--same-initial-noise", action="store_true")
    p.add_argument("--rank", type=number(int, 1), default=16, help="LoRA rank of a fresh adapter")
    p.add_argument("--fm", action="store_true", help="also the flow-matching estimator")
    p.add_argument("--seed", type=number(int, 0), default=0)
    p.add_argument("--json", default=None, help="write the figures here as JSON")
    args = p.parse_args(argv)
    if args.prompts < 4 or args.group_size < 2:
        p.error("--prompts must be >= 4 and --group-size >= 2")
    window = None
    if args.window:
        try:
            window = tuple(int(v) for v in args.window.split(","))
            assert len(window) == 2 and 0 <= window[0] < window[1] <= 10
        except (ValueError, AssertionError):
            p.error(f"--window must be 'start,end' with 0 <= start < end <= 10, got {args.window}")

    import torch

    from flowopd.algorithms import group_advantages
    from flowopd.algorithms.sft import add_noise
    from flowopd.engine.logging import quiet_libraries
    from flowopd.eval.gradient_snr import gradient_snr, gradient_snr_stderr, update_cosine
    from flowopd.eval.report import write_json
    from flowopd.models import load_model
    from flowopd.paths import resolve_model_path
    from flowopd.perf import machine_info
    from flowopd.rewards.base import get_reward
    from flowopd.rollouts import collect_rollouts, epoch_prompts, load_prompts, rescore_step
    from flowopd.sampling import SamplerSpec

    quiet_libraries()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(resolve_model_path(args.model), device=device, dtype="float32")
    torch.manual_seed(args.seed)
    if args.lora:
        model.load_adapter(args.lora, "policy")
    else:
        model.add_adapter("policy", rank=args.rank, alpha=2 * args.rank, init=True)
    model.set_adapter("policy", trainable=True)
    params = [q for q in model.transformer.parameters() if q.requires_grad]
    cfg = args.guidance if args.guidance is not None else model.default_guidance_scale
    n, g = args.prompts, args.group_size
    recs = epoch_prompts(load_prompts(f"world:{args.task}"), n, args.seed, 0)
    if args.reward == "redness":

        def reward(images, prompts, metadata):
            return (images[:, 0] - 0.5 * (images[:, 1] + images[:, 2])).flatten(1).mean(1)
    else:
        reward = get_reward(args.reward or ("toy_geneval" if args.task == "geneval" else "toy_ocr"))

    t0 = time.time()
    model.transformer.eval()
    spec = SamplerSpec(10, noise_level=args.noise, guidance_scale=cfg, sde_window=window)
    ro = collect_rollouts(
        model,
        recs,
        0,
        g,
        spec,
        batch_size=64,
        seed=args.seed,
        epoch=0,
        reward=reward,
        same_initial_noise=args.same_initial_noise,
    )
    adv = group_advantages(ro.rewards, ro.group_ids, std="group", clip=5.0).to(device)
    steps = [j for j in range(10) if bool(ro.trajectory.stochastic[j])]
    live = [k for k in range(n) if float(adv[k * g : (k + 1) * g].abs().sum()) > 0]

    def flat_grad(loss) -> torch.Tensor:
        for q in params:
            q.grad = None
        loss.backward()
        return torch.cat([q.grad.reshape(-1) for q in params]).cpu()

    if len(live) < 2:
        from flowopd.errors import UserError

        raise UserError(
            f"only {len(live)} of {n} groups have reward variance: the SNR needs at least 2; "
            "raise --prompts or --group-size"
        )
    groups = [torch.arange(k * g, (k + 1) * g) for k in live]

    def logp_grad(rows: torch.Tensor, j: int) -> torch.Tensor:
        step, _ = rescore_step(model, ro.trajectory[rows], j, ro.cond[rows], spec)
        return flat_grad(-(adv[rows] * step.log_prob).mean())

    model.transformer.train()
    pg = torch.stack([torch.stack([logp_grad(rows, j) for j in steps]) for rows in groups])
    result = {
        "machine": machine_info(device.type),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "reward_mean": float(ro.rewards.mean()),
        "groups_with_variance": len(live),
        "policy_gradient": {
            "per_step": {str(j): gradient_snr(pg[:, i]) for i, j in enumerate(steps)},
            "all_steps": gradient_snr(pg.sum(1)),
            "all_steps_stderr": gradient_snr_stderr(pg.sum(1)),
            "per_step_stderr": {str(j): gradient_snr_stderr(pg[:, i]) for i, j in enumerate(steps)},
        },
    }
    if args.fm:
        x0 = ro.trajectory.latents[:, -1]
        sigmas = [float(s) for s in ro.trajectory.sigmas[:-1]]
        gen = torch.Generator().manual_seed(args.seed + 1)

        def fm_loss(rows, s):
            x, eps = x0[rows].to(device), torch.randn(x0[rows].shape, generator=gen).to(device)
            v = model.velocity(add_noise(x, eps, s), s, ro.cond[rows])
            return (adv[rows] * ((v - (eps - x)) ** 2).flatten(1).mean(1)).mean()

        fg = torch.stack(
            [torch.stack([flat_grad(fm_loss(rows, s)) for s in sigmas]) for rows in groups]
        )
        result["flow_matching"] = {
            "per_sigma": {f"{s:.3f}": gradient_snr(fg[:, i]) for i, s in enumerate(sigmas)},
            "all_sigmas": gradient_snr(fg.sum(1)),
            "all_sigmas_stderr": gradient_snr_stderr(fg.sum(1)),
            "per_sigma_stderr": {
                f"{s:.3f}": gradient_snr_stderr(fg[:, i]) for i, s in enumerate(sigmas)
            },
        }
    result["seconds"] = round(time.time() - t0, 1)

    print(f"{args.reward or args.task}: {n} groups x {g}, SDE noise {args.noise}, window {window or 'all'}, "
          f"CFG {cfg}; reward {result['reward_mean']:.3f}; {len(live)} groups vary; "
          f"{result['seconds']:.0f} s ({device.type})")  # fmt: skip
    print("per-group SNR s (1/s groups for an update with SNR 1; negative = below resolution)")
    pgr = result["policy_gradient"]
    rows = [("GRPO log-prob, step", pgr["per_step"], pgr["per_step_stderr"], pgr["all_steps"],
             pgr["all_steps_stderr"])]  # fmt: skip
    if args.fm:
        fmr = result["flow_matching"]
        rows.append(("flow matching, sigma", fmr["per_sigma"], fmr["per_sigma_stderr"],
                     fmr["all_sigmas"], fmr["all_sigmas_stderr"]))  # fmt: skip
    print("  (each figure +- its bootstrap standard error)")
    for name, per, per_se, total, se in rows:
        print(f"  {name}: " + " ".join(f"{k}:{v:+.4f}+-{per_se[k]:.4f}" for k, v in per.items()))
        print(f"    all together: s = {total:+.4f} +- {se:.4f}; an update of 16 groups has cosine "
              f"{update_cosine(total, 16):.2f} with the true gradient, of 128: "
              f"{update_cosine(total, 128):.2f}")  # fmt: skip
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    from flowopd.cli.common import run_script

    run_script(main)
