"""Merge cold start for Flow-OPD (METHODS.md §3.2): combine the teachers' LoRAs.

A LoRA layer adds ``dW = s * B @ A`` to a frozen weight W (out, in), with A (r, in),
B (out, r) and scale ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). For K
teachers with weights w_k (normalised to sum 1, except for ``sum``) three merges are offered:

- ``ab_mean`` (the published code): ``A = sum_k w_k A_k``, ``B = sum_k w_k B_k``, same
  r and alpha. Its delta is ``s (sum w_k B_k)(sum w_k A_k)``, which is NOT the average
  delta ``sum_k w_k s B_k A_k``: cross terms ``w_j w_k B_j A_k`` appear and each own
  term is shrunk by ``w_k^2 / w_k`` (1/2 for two teachers).
- ``delta``: the exact average ``dW = sum_k w_k s_k B_k A_k``, re-factorised to rank R
  by truncated SVD ``dW ~= U_R S_R V_R^T``, singular values split evenly:
  ``B = U_R sqrt(S_R)``, ``A = sqrt(S_R) V_R^T``, written with ``alpha = R`` so the
  scale is 1. Exact (error 0) when R >= sum_k r_k (the rank of dW is at most that).
- ``sum``: task arithmetic, ``dW = sum_k w_k s_k B_k A_k`` with the weights as given
  (default 1 each, not normalised): every teacher's whole delta, factorised as ``delta``
  is, at rank R = sum_k r_k by default (exact). Where the teachers' tasks use different
  directions, each keeps its own strength instead of half of it.

Each reports per layer the relative Frobenius error of the merged delta against the exact
weighted delta dW (the average; the sum for ``sum``), ``||dW_merged - dW||_F / ||dW||_F``:
the SVD truncation error for ``delta`` and ``sum``, the cross-term error for ``ab_mean``.

Files: LoRA directories in the diffusers format that ``SD3Model.save_adapter`` writes
(``pytorch_lora_weights.safetensors``: keys ``transformer.<module>.lora_A.weight`` /
``lora_B.weight``, and the peft ``LoraConfig`` under the safetensors metadata key
``lora_adapter_metadata`` with ``transformer.``-prefixed fields). A teacher file without
metadata is read with alpha = r (scale 1), as diffusers loads such a file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from flowopd.errors import UserError, unknown
from flowopd.models.adapters import LoraFile, read_lora, write_lora

__all__ = [
    "MERGE_METHODS",
    "LoraFile",
    "lora_delta",
    "merge_ab_mean",
    "merge_delta",
    "relative_error",
    "read_lora",
    "write_lora",
    "merge_loras",
    "MergeReport",
]

MERGE_METHODS = ("ab_mean", "delta", "sum")


# --------------------------------------------------------------------------------------
# the math, on tensors


def lora_delta(a: Tensor, b: Tensor, scale: float) -> Tensor:
    """``dW = scale * B @ A``: A (r, in), B (out, r) -> (out, in), float64."""
    return scale * (b.double() @ a.double())


def _normalise(weights: Sequence[float] | None, k: int, normalise: bool = True) -> list[float]:
    """The teachers' weights: checked, then scaled to sum 1 (``normalise``) or as given."""
    if weights is None:
        return [1.0 / k if normalise else 1.0] * k
    if len(weights) != k:
        raise UserError(f"{len(weights)} weights for {k} teachers; give one weight per teacher")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"merge weights must be >= 0 and not all 0, got {list(weights)}")
    total = float(sum(weights)) if normalise else 1.0
    return [w / total for w in weights]


def merge_ab_mean(
    a_list: Sequence[Tensor], b_list: Sequence[Tensor], weights: Sequence[float] | None = None
) -> tuple[Tensor, Tensor]:
    """The published merge: ``A = sum w_k A_k``, ``B = sum w_k B_k`` (w normalised).

    a_list: K tensors (r, in); b_list: K tensors (out, r), all of one rank r.
    Returns (A (r, in), B (out, r)) in float32; the scale stays the teachers' alpha / r.

    >>> a, b = merge_ab_mean([torch.ones(1, 2), 3 * torch.ones(1, 2)], [torch.ones(2, 1)] * 2)
    >>> a.tolist(), b.tolist()
    ([[2.0, 2.0]], [[1.0], [1.0]])
    """
    w = _normalise(weights, len(a_list))
    shapes = {(tuple(a.shape), tuple(b.shape)) for a, b in zip(a_list, b_list, strict=True)}
    if len(shapes) != 1:
        raise UserError(
            f"ab_mean needs teachers of one rank and shape, got {sorted(shapes)}; "
            "use --method delta"
        )
    a = sum(wk * ak.double() for wk, ak in zip(w, a_list, strict=True))
    b = sum(wk * bk.double() for wk, bk in zip(w, b_list, strict=True))
    return a.float(), b.float()


def merge_delta(
    a_list: Sequence[Tensor],
    b_list: Sequence[Tensor],
    scales: Sequence[float],
    rank: int,
    weights: Sequence[float] | None = None,
    normalise: bool = True,
) -> tuple[Tensor, Tensor, float]:
    """Exact weighted-average (or, not normalised, weighted-sum) delta, re-factorised to
    ``rank`` by truncated SVD.

        dW = sum_k w_k s_k B_k A_k = U S V^T         (out, in)
        B  = U[:, :R] sqrt(S[:R]),  A = sqrt(S[:R]) V^T[:R]      (scale 1: alpha = R)

    a_list: K tensors (r_k, in); b_list: K tensors (out, r_k); scales: K floats s_k.
    weights: w_k, normalised to sum 1 unless ``normalise`` is False (``sum``: 1 each).
    When R exceeds min(out, in) the extra rows of A / columns of B are zero, so every
    layer has rank R. Returns (A (R, in), B (out, R), relative Frobenius error).
    """
    w = _normalise(weights, len(a_list), normalise)
    if rank < 1:
        raise UserError(f"rank must be >= 1, got {rank}")
    dw = sum(
        wk * lora_delta(a, b, s) for wk, a, b, s in zip(w, a_list, b_list, scales, strict=True)
    )  # (out, in) float64
    u, sv, vh = torch.linalg.svd(dw, full_matrices=False)  # (out, k), (k,), (k, in)
    k = min(rank, sv.shape[0])
    root = sv[:k].sqrt()
    b = torch.zeros(dw.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, dw.shape[1], dtype=torch.float64)
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    return a.float(), b.float(), relative_error(b.double() @ a.double(), dw)


def relative_error(approx: Tensor, exact: Tensor) -> float:
    """``||approx - exact||_F / ||exact||_F`` (0 when both are 0, inf when only exact is)."""
    num = float(torch.linalg.norm((approx - exact).double()))
    den = float(torch.linalg.norm(exact.double()))
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


@dataclass
class MergeReport:
    """What a merge did: per-layer relative Frobenius errors vs the exact weighted delta."""

    method: str
    teachers: list[str]
    weights: list[float]
    rank: int
    alpha: float
    errors: dict[str, float]

    @property
    def mean_error(self) -> float:
        return sum(self.errors.values()) / len(self.errors)

    @property
    def max_error(self) -> float:
        return max(self.errors.values())

    def to_json(self) -> dict:
        return {
            "method": self.method, "teachers": self.teachers, "weights": self.weights,
            "rank": self.rank, "alpha": self.alpha, "layers": len(self.errors),
            "rel_error": {"mean": self.mean_error, "max": self.max_error},
            "per_layer": self.errors,
        }  # fmt: skip

    def summary(self) -> str:
        return (
            f"{self.method} merge of {len(self.teachers)} teachers, rank {self.rank}: relative "
            f"Frobenius error vs the exact weighted delta per layer: mean {self.mean_error:.3g}, "
            f"max {self.max_error:.3g} ({len(self.errors)} layers)"
        )


def merge_loras(
    paths: Sequence[str],
    *,
    method: Literal["ab_mean", "delta", "sum"] = "ab_mean",
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    out: str | Path | None = None,
) -> tuple[LoraFile, MergeReport]:
    """Merge the LoRA directories ``paths`` layer by layer (see the module docstring).

    rank: the output rank of ``delta`` (default: the largest teacher rank) or ``sum``
    (default: the sum of the teachers' ranks, exact); ``ab_mean`` keeps the teachers'
    rank and accepts no other. out: when given, the merged LoRA is
    written there (diffusers format, with ``merge.json``). Returns the merged LoRA and
    the report.
    """
    if method not in MERGE_METHODS:
        raise unknown("merge method", method, MERGE_METHODS)
    if not paths:
        raise UserError("no teachers to merge; pass --teachers DIR [DIR ...]")
    loras = [read_lora(p) for p in paths]
    w = _normalise(weights, len(loras), normalise=method != "sum")
    names = list(loras[0].modules)
    for p, lo in zip(paths, loras, strict=True):
        if set(lo.modules) != set(names):
            odd = sorted(set(lo.modules) ^ set(names))[0]
            raise UserError(
                f"teacher '{p}' adapts other layers than '{paths[0]}' (e.g. {odd}); "
                "merge teachers trained with the same target modules"
            )
    ranks = {int(lo.config.get("r", 0)) for lo in loras}
    alphas = {float(lo.config.get("lora_alpha", 0)) for lo in loras}
    if method == "ab_mean":
        if len(ranks) != 1 or len(alphas) != 1:
            raise UserError(
                f"ab_mean averages A and B, so the teachers need one rank and alpha, got ranks "
                f"{sorted(ranks)} and alphas {sorted(alphas)}; use --method delta"
            )
        if rank is not None and rank != next(iter(ranks)):
            raise UserError(f"ab_mean keeps the teachers' rank {next(iter(ranks))}; drop --rank")
    out_rank = rank or (
        sum(int(lo.config.get("r", 0)) for lo in loras) if method == "sum" else max(ranks)
    )
    merged: dict[str, tuple[Tensor, Tensor]] = {}
    errors: dict[str, float] = {}
    for m in names:
        a_list = [lo.modules[m][0] for lo in loras]
        b_list = [lo.modules[m][1] for lo in loras]
        scales = [lo.scale(m) for lo in loras]
        if method == "ab_mean":
            a, b = merge_ab_mean(a_list, b_list, w)
            exact = sum(
                wk * lora_delta(ak, bk, s)
                for wk, ak, bk, s in zip(w, a_list, b_list, scales, strict=True)
            )
            errors[m] = relative_error(lora_delta(a, b, scales[0]), exact)
        else:
            a, b, errors[m] = merge_delta(a_list, b_list, scales, out_rank, w, normalise=False)
        merged[m] = (a, b)
    config = dict(loras[0].config)
    if method != "ab_mean":  # scale 1: alpha = r = R; one rank everywhere
        config.update(r=out_rank, lora_alpha=out_rank, use_rslora=False)
    config.update(rank_pattern={}, alpha_pattern={})
    report = MergeReport(
        method=method, teachers=[str(p) for p in paths], weights=w, rank=int(config["r"]),
        alpha=float(config["lora_alpha"]), errors=errors,
    )  # fmt: skip
    lora = LoraFile(merged, config)
    if out is not None:
        write_lora(out, lora, {"merge.json": json.dumps(report.to_json(), indent=1) + "\n"})
    return lora, report
