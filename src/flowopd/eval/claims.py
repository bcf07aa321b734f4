"""The Flow-OPD paper's qualitative claims, checked on a report table (METHODS.md §3).

Given the pipeline's rows (``base``, ``teacher:<task>``, ``grpo-mix``, ``cold-start``,
``flow-opd`` and optionally ``flow-opd (no MAR)``), each claim is True, False, or None
when the table lacks a row it needs:

1. seesaw: each teacher gains >= ``gain`` over the base on its own benchmark and
   <= ``leak`` on every other task benchmark;
2. GRPO-Mix ends below each specialist on that specialist's benchmark;
3. the Flow-OPD student is within ``tolerance`` of (or above) each teacher on its benchmark;
4. the Flow-OPD student has the best average of all rows;
5. MAR: toy-quality (the quality column) is higher with MAR than without, by more than
   ``quality_margin`` (smaller differences are ties), at task scores no more than
   ``tolerance`` below the MAR-off run's ("at equal task scores").

Evaluation noise: a row may carry ``"se": {column: standard error}`` (``flowopd.eval.
stats``). Every difference is then printed with its standard error, and the claims that
state an order (2, 4, 5) pass only when the difference exceeds ``z`` standard errors of
the difference (``sqrt(se_a^2 + se_b^2)``), so an order inside the noise is not a PASS.
Claims 1 and 3 compare a point estimate with a stated bar. Rows without ``se`` count as
exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from flowopd.eval.stats import diff_se

__all__ = ["Claim", "check_claims", "task_column"]


@dataclass(frozen=True)
class Claim:
    name: str
    passed: bool | None
    detail: str

    def line(self) -> str:
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[self.passed]
        return f"[{mark}] {self.name}: {self.detail}"

    def to_dict(self) -> dict:
        return asdict(self)


def task_column(task: str, columns: Sequence[str]) -> str | None:
    """The benchmark column of a teacher task: ``task`` itself or ``toy-<task>``."""
    for c in (task, f"toy-{task}"):
        if c in columns:
            return c
    return None


@dataclass
class _Table:
    """The rows of a report table, by model name, with the teachers' task columns."""

    rows: Sequence[dict]
    columns: Sequence[str]

    def __post_init__(self) -> None:
        self.by = {r["model"]: r for r in self.rows}
        self.base, self.mix, self.opd = (self.by.get(m) for m in ("base", "grpo-mix", "flow-opd"))
        self.teachers = {  # task -> row
            m.split(":", 1)[1]: r for m, r in self.by.items() if m.startswith("teacher:")
        }
        self.cols = {t: task_column(t, self.columns) for t in self.teachers}
        self.task_cols = [c for c in self.cols.values() if c]

    @staticmethod
    def val(row: dict | None, col: str | None) -> float | None:
        return None if row is None or col is None else row.get(col)

    @staticmethod
    def se(*pairs: tuple[dict | None, str | None]) -> float:
        """Standard error of a difference of the (row, column) scores."""
        return diff_se(*((r or {}).get("se", {}).get(c or "", 0.0) for r, c in pairs))


def check_claims(
    rows: Sequence[dict],
    columns: Sequence[str],
    *,
    gain: float = 0.2,
    leak: float = 0.05,
    tolerance: float = 0.02,
    quality: str = "toy-quality",
    quality_margin: float = 0.005,
    z: float = 2.0,
) -> list[Claim]:
    """Check claims 1-5 (module docstring) on ``rows`` (``table.json``); see ``Claim``."""
    t = _Table(rows, columns)
    return [
        *_seesaw(t, gain, leak),
        *_mix_below(t, z),
        *_within(t, tolerance),
        _best_average(t, z),
        _mar(t, quality, quality_margin, tolerance, z),
    ]


def _seesaw(t: _Table, gain: float, leak: float) -> list[Claim]:
    """1. Each teacher gains >= gain on its own column and <= leak on the others."""
    claims = []
    for task, row in t.teachers.items():
        own, base = t.cols[task], t.base
        b, v = t.val(base, own), t.val(row, own)
        if b is None or v is None:
            claims.append(Claim(f"seesaw, teacher:{task}", None, "no base row or no column"))
            continue
        others = [(c, row[c] - base[c]) for c in t.task_cols if c != own and row.get(c) is not None]
        ok = v - b >= gain and all(d <= leak for _, d in others)
        other_txt = (
            ", ".join(f"{c} {d:+.3f}{_pm(t.se((row, c), (base, c)))}" for c, d in others)
            or "no other task"
        )
        claims.append(Claim(
            f"seesaw, teacher:{task}", ok,
            f"{own} {v - b:+.3f}{_pm(t.se((row, own), (base, own)))} over base (needs >= "
            f"{gain:+.2f}); {other_txt} (needs <= {leak:+.2f})",
        ))  # fmt: skip
    return claims


def _mix_below(t: _Table, z: float) -> list[Claim]:
    """2. GRPO-Mix below each specialist on its task, beyond z standard errors."""
    claims = []
    for task, row in t.teachers.items():
        col = t.cols[task]
        m, v = t.val(t.mix, col), t.val(row, col)
        name = f"grpo-mix below teacher:{task} on {col}"
        if m is None or v is None:
            claims.append(Claim(name, None, "no grpo-mix row"))
            continue
        e = t.se((t.mix, col), (row, col))
        claims.append(Claim(name, v - m > z * e and m < v, f"{m:.3f} vs {v:.3f} "
                            f"({m - v:+.3f}{_pm(e)}{_beyond(z, e)})"))  # fmt: skip
    return claims


def _within(t: _Table, tolerance: float) -> list[Claim]:
    """3. The student within ``tolerance`` of (or above) each teacher on its task."""
    claims = []
    for task, row in t.teachers.items():
        col = t.cols[task]
        s, v = t.val(t.opd, col), t.val(row, col)
        name = f"flow-opd within {tolerance} of teacher:{task} on {col}"
        if s is None or v is None:
            claims.append(Claim(name, None, "no flow-opd row"))
            continue
        e = _pm(t.se((t.opd, col), (row, col)))
        claims.append(Claim(name, s >= v - tolerance, f"{s:.3f} vs {v:.3f} ({s - v:+.3f}{e})"))
    return claims


def _best_average(t: _Table, z: float) -> Claim:
    """4. The student has the best average of all rows, beyond z standard errors."""
    opd, name = t.opd, "flow-opd has the best average"
    if opd is None or opd.get("average") is None:
        return Claim(name, None, "no flow-opd row")
    rivals = [r for r in t.rows if r["model"] != "flow-opd" and r.get("average") is not None]
    best = max(rivals, key=lambda r: r["average"], default=None)
    if best is None:
        return Claim(name, True, f"{opd['average']:.3f}")
    d = opd["average"] - best["average"]
    e = t.se((opd, "average"), (best, "average"))
    return Claim(name, d > z * e and d > 0, f"{opd['average']:.3f} vs next best {best['model']} "
                 f"{best['average']:.3f} ({d:+.3f}{_pm(e)}{_beyond(z, e)})")  # fmt: skip


def _mar(t: _Table, quality: str, margin: float, tolerance: float, z: float) -> Claim:
    """5. MAR raises quality by > margin (and z se) at task scores within tolerance."""
    opd, no_mar = t.opd, t.by.get("flow-opd (no MAR)")
    q, q0 = t.val(opd, quality), t.val(no_mar, quality)
    if q is None or q0 is None:
        return Claim("MAR raises quality", None, "no MAR-off row (mar_ablation=true)")
    tasks_txt = ", ".join(f"{c} {opd[c]:.3f} vs {no_mar[c]:.3f}" for c in t.task_cols)
    e = t.se((opd, quality), (no_mar, quality))
    ok = q - q0 > max(margin, z * e) and all(
        opd[c] >= no_mar[c] - tolerance for c in t.task_cols if opd.get(c) is not None
    )
    return Claim(
        "MAR raises quality", ok,
        f"{quality} {q:.4f} with vs {q0:.4f} without ({q - q0:+.4f}{_pm(e)}; needs > "
        f"+{margin}{_beyond(z, e)}); {tasks_txt} (needs >= -{tolerance})",
    )  # fmt: skip


def _pm(x: float) -> str:
    return f" +- {x:.3f}" if x > 0 else ""


def _beyond(z: float, se: float) -> str:
    return f", needs > {z:g} se = {z * se:.3f}" if se > 0 else ""
