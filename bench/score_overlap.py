"""Reward scoring overlapped with sampling vs scoring after sampling, in one run.

Collects one GRPO epoch of rollouts (``--prompts`` x ``--group`` images, 10-step SDE, in
batches of ``--batch``) from the embedded model twice per repeat:

    sequential  collect_rollouts(...), then reward(all images)      (the old order)
    overlapped  collect_rollouts(..., reward=reward, overlap=True)    (the recipes' default
                                                                      on a GPU)

and reports the median wall time of each and their ratio, with the machine. The default
reward is the real OCR reward (``ocr``: RapidOCR, ONNX, a worker pool), whose own
``submit`` runs while the next batch samples; ``--reward toy_ocr`` shows the case where
scoring is too cheap to matter.

    python bench/score_overlap.py [--reward ocr] [--repeats 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLOWOPD_NO_PROGRESS", "1")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reward", default="ocr")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import torch

    from flowopd.eval.report import write_json
    from flowopd.models.sd3 import SD3Model
    from flowopd.paths import default_model
    from flowopd.perf import machine_info
    from flowopd.rewards import get_reward
    from flowopd.rollouts import collect_rollouts
    from flowopd.sampling import SamplerSpec
    from flowopd.world.prompts import make_records

    model = SD3Model.from_pretrained(default_model())
    reward = get_reward(args.reward)
    records = make_records("ocr", "train", args.prompts, seed=0)
    spec = SamplerSpec(num_steps=10, kind="sde", noise_level=0.7, guidance_scale=3.0)
    kw = dict(spec=spec, batch_size=args.batch, seed=0, epoch=0)

    def sequential() -> torch.Tensor:
        ro = collect_rollouts(model, records, 0, args.group, overlap=False, **kw)
        return reward(ro.images, ro.prompts, ro.records)

    def overlapped() -> torch.Tensor:
        ro = collect_rollouts(model, records, 0, args.group, reward=reward, overlap=True, **kw)
        return ro.rewards

    times: dict[str, list[float]] = {"sequential": [], "overlapped": []}
    scores = {}
    overlapped()  # warm-up: OCR engine load, first-call allocations
    for _ in range(args.repeats):
        for name, fn in (("sequential", sequential), ("overlapped", overlapped)):
            t0 = time.perf_counter()
            scores[name] = fn()
            times[name].append(time.perf_counter() - t0)
    same = bool(torch.allclose(scores["sequential"].float(), scores["overlapped"].float()))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "machine": machine_info("cpu"),
        "reward": args.reward,
        "images": args.prompts * args.group,
        "batch": args.batch,
        "seconds": {k: round(v, 3) for k, v in med.items()},
        "all_seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "speedup": round(med["sequential"] / med["overlapped"], 3),
        "same_scores": same,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
