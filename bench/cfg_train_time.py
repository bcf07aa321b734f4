"""CPU time of a GRPO training phase under each way of differentiating the CFG pair.

One epoch of rollouts (16 prompts x 8 images, 10-step SDE, a 3-step window trained, as
configs/toy/grpo_geneval.yaml) is collected once; then the training phase (re-score with
grad, KL reference forward, clipped loss, backward over minibatches of 32) runs repeatedly,
interleaving three variants:

- ``both``:  one batched forward over [negative, positive], gradient through both halves;
- ``cond``:  the same forward, the unconditional half detached (train.cfg_grad=cond, the
  default): the same FLOPs, since autograd still back-propagates through those rows;
- ``split``: model.cfg_forward=split with cfg_grad=cond: the negative half runs without
  autograd, the backward covers half the rows.

Process CPU time is reported (robust on a shared machine), with wall time beside it, and the
relative difference between the ``cond`` and ``split`` gradients (float round-off only).

    python bench/cfg_train_time.py [--model embedded|tiny|PATH] [--repeats 3] [--prompts 16]
                                   [--json OUT]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLOWOPD_NO_PROGRESS", "1")

import torch

VARIANTS = ("both", "cond", "split")
GUIDANCE, NOISE = 3.0, 0.7
PROMPTS = ["a photo of a red circle", "two blue squares", "a green star", "a yellow cross"]


def _model(name: str):
    from flowopd.models import load_model
    from flowopd.models.sd3 import SD3Model
    from flowopd.models.tiny import build_tiny_sd3_pipeline
    from flowopd.paths import default_model

    if name == "tiny":
        return SD3Model(build_tiny_sd3_pipeline(), max_sequence_length=8)
    return load_model(default_model() if name == "embedded" else name, device="cpu")


def _train_phase(model, ro, adv: torch.Tensor, variant: str, batch: int = 32) -> list:
    """One pass over the rollouts, as recipes/grpo.py trains; returns the LoRA grads."""
    from flowopd.algorithms import grpo_loss, reference_kl
    from flowopd.rollouts import rescore_step
    from flowopd.sampling import SamplerSpec

    params = model.adapter_parameters("policy")
    for p in params:
        p.grad = None
    model.cfg_forward = "split" if variant == "split" else "batched"
    cfg_grad = "both" if variant == "both" else "cond"
    steps = [i for i in range(ro.trajectory.sigmas.numel() - 1) if ro.trajectory.stochastic[i]]
    n_batches = -(-len(ro) // batch)
    model.transformer.train()
    for start in range(0, len(ro), batch):
        rows = torch.arange(start, min(start + batch, len(ro)))
        traj, cond, a = ro.trajectory[rows], ro.cond[rows], adv[rows]
        for j in steps:
            spec = SamplerSpec(num_steps=10, noise_level=NOISE, guidance_scale=GUIDANCE)
            step, _ = rescore_step(model, traj, j, cond, spec, cfg_grad=cfg_grad)
            with torch.no_grad(), model.adapters_disabled():
                ref, _ = rescore_step(model, traj, j, cond, spec)
            dt = traj.sigmas[j + 1] - traj.sigmas[j]
            kl = reference_kl(step.mean, ref.mean, step.std, dt)
            loss, _ = grpo_loss(step.log_prob, traj.log_probs[:, j], a, clip_range=1e-3, kl=kl,
                                beta=0.04)  # fmt: skip
            (loss / (len(steps) * n_batches)).backward()
    model.cfg_forward = "batched"
    return [p.grad.clone() for p in params]


def run(model_name: str, repeats: int, prompts: int = 16) -> dict:
    from flowopd.rollouts import collect_rollouts
    from flowopd.sampling import SamplerSpec

    torch.manual_seed(0)
    model = _model(model_name)
    model.add_adapter("policy", rank=16, alpha=32)
    model.set_adapter("policy", trainable=True)
    with torch.no_grad():  # B != 0, as after a few updates: every LoRA factor gets a gradient
        for p in model.adapter_parameters("policy"):
            p.normal_(0, 0.05)
    records = [{"prompt": PROMPTS[i % len(PROMPTS)]} for i in range(prompts)]
    spec = SamplerSpec(10, noise_level=NOISE, guidance_scale=GUIDANCE, sde_window=(1, 4))
    ro = collect_rollouts(model, records, 0, 8, spec, batch_size=32, seed=0, epoch=0)
    adv = torch.randn(len(ro), generator=torch.Generator().manual_seed(0))
    _train_phase(model, ro, adv, "both")  # warm-up
    cpu = {v: [] for v in VARIANTS}
    wall = {v: [] for v in VARIANTS}
    for _ in range(repeats):
        for v in VARIANTS:
            c0, w0 = time.process_time(), time.perf_counter()
            _train_phase(model, ro, adv, v)
            cpu[v].append(time.process_time() - c0)
            wall[v].append(time.perf_counter() - w0)
    g_cond, g_split = _train_phase(model, ro, adv, "cond"), _train_phase(model, ro, adv, "split")
    num = sum(float((a - b).pow(2).sum()) for a, b in zip(g_cond, g_split, strict=True))
    den = sum(float(b.pow(2).sum()) for b in g_cond)
    return {
        "model": model_name,
        "images": len(ro),
        "threads": torch.get_num_threads(),
        "cpu_s": cpu,
        "wall_s": wall,
        "cpu_median_s": {v: statistics.median(cpu[v]) for v in VARIANTS},
        "split_vs_cond_grad_rel_diff": (num / den) ** 0.5,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded", help="embedded, tiny or a pipeline directory")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=16, help="prompts x 8 images")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from flowopd.engine.logging import quiet_libraries
    from flowopd.eval.report import write_json

    quiet_libraries()
    r = run(args.model, args.repeats, args.prompts)
    base = r["cpu_median_s"]["both"]
    for v in VARIANTS:
        med = r["cpu_median_s"][v]
        print(f"{v:<6} CPU {med:6.2f} s  ({med / base:.2f}x)  runs {r['cpu_s'][v]}")
    print(f"split vs cond gradient: relative difference {r['split_vs_cond_grad_rel_diff']:.1e}")
    if args.json:
        write_json(args.json, r)
    return r


if __name__ == "__main__":
    main()
