"""How a model fails toy-GenEval's counting and binding categories (position, color_attr)
and toy-OCR, per sample.

Each image of a counting prompt is sorted into ``ok``, ``one fewer`` (the caption-noise
bias: n - 1 objects of the class) or ``n objects = k``. Each image of a position or
colour-attribution prompt into one outcome: ``ok`` (strictly correct); the caption-noise
biases ``mirrored`` / ``turned`` / ``placed one left out`` (position: the relation reversed
/ drawn on the other axis, world v5's bias / the reference alone, world v6's bias), ``side
by side`` (the pair in the two-object row, the relation ignored) and ``swapped`` /
``leaked`` (color_attr: the colours exchanged / the second object in the first one's
colour); and the model's own errors: ``wrong shapes`` (two objects, not the prompt's two
shapes, e.g. two squares), ``first colour lost`` (the second object right, the first not),
``other colours`` and ``n objects = k``. Each OCR image: ``ok``, ``cut`` (only the first
character, world v5's bias), ``cut later`` (a correct prefix), ``transposed`` (the last
two characters swapped, v3's bias) or ``other``.

    python scripts/failure_modes.py                               # the embedded base
    python scripts/failure_modes.py --lora runs/toy/nft_geneval/lora --guidance 1 --split train
    python scripts/failure_modes.py --per-prompt --n 24 --k 8     # each prompt's outcomes too

Measured on the world v3 base (48 test prompts x 4, 40-step ODE, CFG 3.0): position ok
0.20, mirrored 0.39, wrong shapes 0.41; color_attr ok 0.23, swapped 0.27, one colour for
both 0.46 (docs/EMBEDDED_MODEL.md).
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def outcome(dets: list, rec: dict) -> str:
    """The outcome of one image's detections against a position / color_attr record."""
    from flowopd.rewards.toy import geneval_evaluate
    from flowopd.world.spec import IMAGE_SIZE

    if geneval_evaluate(dets, rec).strict:
        return "ok"
    inc = rec["include"]
    if rec["tag"] == "counting":
        n = int(inc[0]["count"])
        same = all(d.shape == inc[0]["class"] for d in dets)
        return "one fewer" if same and len(dets) == n - 1 else f"n objects = {len(dets)}"
    if rec["tag"] == "position" and [d.shape for d in dets] == [inc[0]["class"]]:
        return "placed one left out"
    if len(dets) != 2:
        return f"n objects = {len(dets)}"
    if sorted(d.shape for d in dets) != sorted(i["class"] for i in inc):
        return "wrong shapes"
    a, b = (next(d for d in dets if d.shape == i["class"]) for i in inc)
    if rec["tag"] == "color_attr":
        want = (inc[0]["color"], inc[1]["color"])
        got = (a.color, b.color)
        return {
            want[::-1]: "swapped",
            (want[0], want[0]): "leaked",
            (want[1], want[1]): "second colour twice",
        }.get(got, "first colour lost" if got[1] == want[1] else "other colours")
    ax, ay = (a.box[0] + a.box[2]) / 2, (a.box[1] + a.box[3]) / 2
    bx, by = (b.box[0] + b.box[2]) / 2, (b.box[1] + b.box[3]) / 2
    horizontal = abs(ax - bx) > abs(ay - by)
    row = IMAGE_SIZE / 2  # the two-object row's centre line
    if horizontal and max(abs(ay - row), abs(by - row)) <= 2:
        return "side by side"
    if horizontal != (inc[1]["position"][0] in ("left of", "right of")):
        return "turned"
    return "mirrored"


def ocr_outcome(read: str, text: str) -> str:
    """The outcome of one OCR image: what was read against the target ``text``."""
    if read == text:
        return "ok"
    if read == text[:1]:
        return "cut"
    if read and text.startswith(read):
        return "cut later"
    if len(text) >= 2 and read == text[:-2] + text[-1] + text[-2]:
        return "transposed"
    return "other"


def main(argv: list[str] | None = None) -> int:
    from flowopd.cli import OneLineParser
    from flowopd.cli.common import number

    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded", help="model dir (default: embedded)")
    p.add_argument("--lora", default=None, help="adapter dir (default: none)")
    p.add_argument("--guidance", type=number(float, 0), default=None, help="CFG (default: model's)")
    p.add_argument("--steps", type=number(int, 1), default=40, help="ODE steps")
    p.add_argument("--split", choices=["test", "train"], default="test")
    p.add_argument("--n", type=number(int, 1), default=48, help="prompts per category")
    p.add_argument("--k", type=number(int, 1), default=4, help="images per prompt")
    p.add_argument("--seed", type=number(int, 0), default=3)
    p.add_argument("--per-prompt", action="store_true",
                   help="also print each prompt's outcomes (GenEval categories)")  # fmt: skip
    args = p.parse_args(argv)

    import torch

    from flowopd.engine.logging import quiet_libraries
    from flowopd.models import load_model
    from flowopd.paths import resolve_model_path
    from flowopd.rewards.toy import detect_objects, images_to_numpy, read_text
    from flowopd.rollouts import collect_rollouts
    from flowopd.sampling import SamplerSpec
    from flowopd.world.prompts import make_records

    quiet_libraries()
    model = load_model(resolve_model_path(args.model), device=torch.device("cpu"), dtype="float32")
    if args.lora:
        model.load_adapter(args.lora, "lora0")
        model.set_adapter("lora0")
    cfg = args.guidance if args.guidance is not None else model.default_guidance_scale
    spec = SamplerSpec(args.steps, kind="ode", guidance_scale=cfg)
    print(f"{args.split} split, {args.n} prompts x {args.k}, {args.steps}-step ODE, CFG {cfg}")
    for tag in ("counting", "position", "color_attr", "ocr"):
        task, tags = ("ocr", None) if tag == "ocr" else ("geneval", [tag])
        recs = make_records(task, args.split, args.n, seed=1, tags=tags)
        ro = collect_rollouts(
            model, recs, 0, args.k, spec, batch_size=64, seed=args.seed, epoch=0, record=False
        )
        per_prompt: dict[str, Counter] = defaultdict(Counter)
        for img, rec in zip(images_to_numpy(ro.images), ro.records, strict=True):
            out = (
                ocr_outcome(read_text(img), rec["text"])
                if tag == "ocr"
                else outcome(detect_objects(img), rec)
            )
            per_prompt[rec["prompt"]][out] += 1
        counts = sum(per_prompt.values(), Counter())
        n = sum(counts.values())
        print(f"{tag:11s} " + ", ".join(f"{k} {v / n:.2f}" for k, v in counts.most_common()))
        if args.per_prompt and tag != "ocr":
            for prompt, c in sorted(per_prompt.items()):
                print(f"  {prompt:40s} " + ", ".join(f"{k} {v}" for k, v in c.most_common()))
    return 0


if __name__ == "__main__":
    from flowopd.cli.common import run_script

    run_script(main)
