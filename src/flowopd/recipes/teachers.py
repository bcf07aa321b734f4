"""Teachers as data: load task teachers as named adapters, route prompts, query them.

Shared by the distillation recipes (``opd``, ``sft``). Every teacher is a LoRA adapter
on the one base model (never a second copy of the network); a prompt record is routed
by ``record[key]`` (its task label) to the teacher serving that task, and a whole mixed
batch is answered in one forward with per-sample adapters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flowopd.config.opd import TeacherConfig, teacher_table
from flowopd.errors import UserError, closest
from flowopd.models.base import BASE, Cond, FlowModel
from flowopd.rollouts import epoch_prompts, seed_for

__all__ = [
    "ANCHOR",
    "TeacherSet",
    "load_teachers",
    "teacher_routes",
    "check_tasks",
    "teacher_velocities",
    "mixed_epoch_prompts",
]

ANCHOR = "anchor"  # adapter name of a MAR anchor that is not one of the teachers


@dataclass
class TeacherSet:
    """Teachers loaded on a model.

    routes: ``{task: adapter name}``; anchor: the anchor's adapter name, ``BASE`` for the
    base model, or None when no anchor is used; key: the record key that routes.
    """

    routes: dict[str, str]
    anchor: str | None
    key: str = "task"

    def adapters_for(self, records: Sequence[dict]) -> list[str]:
        """Each record's teacher adapter (see :func:`teacher_routes`)."""
        return teacher_routes(records, self.routes, self.key)


def load_teachers(
    model: FlowModel,
    teachers: Sequence[TeacherConfig],
    *,
    anchor: str | None = None,
    key: str = "task",
) -> TeacherSet:
    """Load each teacher's LoRA as a frozen adapter named ``teacher.adapter``.

    anchor: None = no anchor; '' = the base model (``BASE``); a LoRA path = loaded as
    adapter ``ANCHOR``, unless it is one of the teachers' paths (then that teacher is
    the anchor and nothing is loaded twice). The model's active/trainable adapter is
    left as it was.
    """
    routes = teacher_table(list(teachers))
    anchor_name: str | None = None
    for t in teachers:
        model.load_adapter(str(Path(t.path).expanduser()), t.adapter)
    if anchor == "":
        anchor_name = BASE
    elif anchor is not None:
        same = [t for t in teachers if Path(t.path).resolve() == Path(anchor).resolve()]
        if same:
            anchor_name = same[0].adapter
        else:
            model.load_adapter(str(Path(anchor).expanduser()), ANCHOR)
            anchor_name = ANCHOR
    return TeacherSet(routes=routes, anchor=anchor_name, key=key)


def teacher_routes(records: Sequence[dict], routes: dict[str, str], key: str = "task") -> list[str]:
    """The teacher adapter of each record: ``routes[record[key]]`` (hard routing).

    >>> teacher_routes([{"task": "ocr"}, {"task": "geneval"}], {"ocr": "t_o", "geneval": "t_g"})
    ['t_o', 't_g']
    """
    out = []
    for rec in records:
        task = rec.get(key) if isinstance(rec, dict) else None
        if task not in routes:
            raise _no_teacher(task, rec, routes, key)
        out.append(routes[task])
    return out


def _no_teacher(task, rec, routes: dict[str, str], key: str) -> UserError:
    served = ", ".join(sorted(routes))
    prompt = str(rec.get("prompt", ""))[:60] if isinstance(rec, dict) else ""
    if task is None:
        return UserError(
            f"prompt record {prompt!r} has no '{key}' label to route it to a teacher; "
            f"label every record (teachers serve: {served})"
        )
    return UserError(
        f"no teacher for task '{task}'{closest(str(task), routes)} (e.g. prompt {prompt!r}); "
        f"the teachers serve: {served}; add a teacher with tasks: [{task}]"
    )


def check_tasks(datasets: Sequence[Sequence[dict]], routes: dict[str, str], key: str) -> None:
    """UserError (one line) unless every record of every dataset has a teacher."""
    for records in datasets:
        seen: set = set()
        for rec in records:
            task = rec.get(key) if isinstance(rec, dict) else None
            if task in seen:
                continue
            if task not in routes:
                raise _no_teacher(task, rec, routes, key)
            seen.add(task)


@torch.no_grad()
def teacher_velocities(
    model: FlowModel,
    x: Tensor,
    sigma: float | Tensor,
    cond: Cond,
    teachers: Sequence[str],
    anchor: str | None = None,
    *,
    guidance_scale: float,
    fused: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """CFG velocities of each sample's routed teacher and of the anchor, without grad.

        v_T[i] = v_{teachers[i]}(x_i, sigma | c_i),   v_A[i] = v_{anchor}(x_i, sigma | c_i)

    x: (B, C, h, w); cond: B rows; teachers: B adapter names (``BASE`` allowed).
    fused: one forward on 2B rows routed ``teachers + [anchor] * B`` (with CFG the
    network sees 4B rows); else one forward per group. Returns v_T (B, C, h, w) and
    v_A (B, C, h, w), or None when ``anchor`` is None; float32.
    """
    b = x.shape[0]
    if anchor is None:
        return model.velocity(x, sigma, cond, guidance_scale=guidance_scale,
                              adapters=teachers), None  # fmt: skip
    if not fused:
        v_t = model.velocity(x, sigma, cond, guidance_scale=guidance_scale, adapters=teachers)
        v_a = model.velocity(x, sigma, cond, guidance_scale=guidance_scale, adapters=[anchor] * b)
        return v_t, v_a
    sig = torch.as_tensor(sigma, dtype=torch.float32)
    sig2 = sig if sig.ndim == 0 else torch.cat([sig, sig])
    v = model.velocity(
        torch.cat([x, x]), float(sig) if sig.ndim == 0 else sig2, Cond.cat([cond, cond]),
        guidance_scale=guidance_scale, adapters=[*teachers, *([anchor] * b)],
    )  # fmt: skip
    return v[:b], v[b:]


def mixed_epoch_prompts(
    datasets: Sequence[Sequence[dict]], ratio: Sequence[int], n: int, seed: int, epoch: int
) -> tuple[list[dict], list[int]]:
    """n records for an epoch drawn from several datasets in proportion ``ratio``.

    Dataset d gets ``n * ratio[d] / sum(ratio)`` records (largest remainders round), each
    drawn as :func:`epoch_prompts` does; the union is shuffled with a seed of (seed,
    epoch), so it is the same on every process and each process's contiguous share
    mixes the tasks. Returns the records and each record's dataset index.
    """
    if len(ratio) != len(datasets) or any(r < 1 for r in ratio):
        raise ValueError(f"ratio {list(ratio)} must hold one positive integer per dataset")
    total = sum(ratio)
    exact = [n * r / total for r in ratio]
    counts = [int(e) for e in exact]
    by_remainder = sorted(range(len(ratio)), key=lambda d: counts[d] - exact[d])
    for d in by_remainder[: n - sum(counts)]:
        counts[d] += 1
    recs: list[dict] = []
    which: list[int] = []
    for d, (records, c) in enumerate(zip(datasets, counts, strict=True)):
        if c:
            recs += epoch_prompts(records, c, seed_for(seed, "dataset", d), epoch)
            which += [d] * c
    order = np.random.default_rng(seed_for(seed, "mix", epoch)).permutation(len(recs))
    return [recs[i] for i in order], [which[i] for i in order]
