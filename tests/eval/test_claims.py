"""check_claims on hand-made tables: each of the paper's claims passes, fails, or is n/a."""

from __future__ import annotations

from flowopd.eval.claims import check_claims, task_column

COLS = ["toy-geneval", "toy-ocr", "toy-quality"]


def _row(model, ge, ocr, q):
    return {"model": model, "toy-geneval": ge, "toy-ocr": ocr, "toy-quality": q,
            "average": round((ge + ocr + q) / 3, 4)}  # fmt: skip


def _paper_like():
    return [
        _row("base", 0.35, 0.65, 0.93),
        _row("teacher:geneval", 0.60, 0.66, 0.92),  # +0.25 own, +0.01 other
        _row("teacher:ocr", 0.30, 0.90, 0.92),  # +0.25 own, -0.05 other
        _row("grpo-mix", 0.50, 0.80, 0.92),
        _row("cold-start", 0.45, 0.75, 0.93),
        _row("flow-opd", 0.59, 0.91, 0.95),  # -0.01 and +0.01 vs the teachers
        _row("flow-opd (no MAR)", 0.59, 0.90, 0.90),
    ]


def _by_name(claims):
    return {c.name: c for c in claims}


def test_all_claims_pass_on_a_paper_like_table():
    claims = check_claims(_paper_like(), COLS)
    assert len(claims) == 2 + 2 + 2 + 1 + 1
    assert all(c.passed is True for c in claims), [c.line() for c in claims if not c.passed]
    c = _by_name(claims)["seesaw, teacher:geneval"]
    assert "toy-geneval +0.250" in c.detail and "toy-ocr +0.010" in c.detail


def test_each_claim_fails_when_its_numbers_say_so():
    rows = _paper_like()
    rows[1]["toy-geneval"] = 0.54  # teacher gains only +0.19
    rows[2]["toy-geneval"] = 0.41  # the OCR teacher leaks +0.06 into GenEval
    rows[3]["toy-ocr"] = 0.95  # GRPO-Mix above the OCR specialist
    rows[5]["toy-geneval"] = 0.51  # student 0.03 below the GenEval teacher (0.54)
    rows[5]["average"] = 0.10  # no longer the best average
    rows[6]["toy-quality"] = 0.96  # MAR-off has better quality
    c = _by_name(check_claims(rows, COLS))
    assert c["seesaw, teacher:geneval"].passed is False
    assert c["seesaw, teacher:ocr"].passed is False
    assert c["grpo-mix below teacher:geneval on toy-geneval"].passed is True  # 0.50 < 0.54
    assert c["grpo-mix below teacher:ocr on toy-ocr"].passed is False
    assert c["flow-opd within 0.02 of teacher:geneval on toy-geneval"].passed is False
    assert c["flow-opd within 0.02 of teacher:ocr on toy-ocr"].passed is True
    assert c["flow-opd has the best average"].passed is False
    assert "next best" in c["flow-opd has the best average"].detail
    assert c["MAR raises quality"].passed is False


def test_mar_claim_needs_a_margin_and_equal_task_scores():
    rows = _paper_like()
    rows[6]["toy-quality"] = 0.947  # 0.950 vs 0.947: a tie (margin 0.005)
    assert _by_name(check_claims(rows, COLS))["MAR raises quality"].passed is False
    rows = _paper_like()
    rows[6]["toy-ocr"] = 0.94  # without MAR the task score is 0.03 higher: not "equal"
    c = _by_name(check_claims(rows, COLS))["MAR raises quality"]
    assert c.passed is False and "toy-ocr 0.910 vs 0.940" in c.detail


def test_missing_rows_give_none_not_a_verdict():
    rows = [r for r in _paper_like() if r["model"] in ("base", "teacher:geneval", "teacher:ocr")]
    c = _by_name(check_claims(rows, COLS))
    assert c["seesaw, teacher:geneval"].passed is True
    assert c["grpo-mix below teacher:ocr on toy-ocr"].passed is None
    assert c["flow-opd has the best average"].passed is None
    assert c["MAR raises quality"].passed is None
    assert c["MAR raises quality"].line().startswith("[n/a ]")


def test_task_column():
    assert task_column("geneval", COLS) == "toy-geneval"
    assert task_column("geneval", ["geneval", "ocr"]) == "geneval"
    assert task_column("pickscore", COLS) is None


def test_order_claims_need_differences_beyond_two_standard_errors():
    rows = _paper_like()
    for r in rows:
        r["se"] = {"toy-geneval": 0.03, "toy-ocr": 0.03, "toy-quality": 0.002, "average": 0.02}
    c = _by_name(check_claims(rows, COLS))
    # mix 0.80 vs OCR teacher 0.90: -0.10, se of the difference 0.042 -> beyond 2 se
    assert c["grpo-mix below teacher:ocr on toy-ocr"].passed is True
    assert "+- 0.042" in c["grpo-mix below teacher:ocr on toy-ocr"].detail
    assert "+0.250 +- 0.042" in c["seesaw, teacher:geneval"].detail
    rows[3]["toy-geneval"] = 0.55  # mix 0.05 below the GenEval teacher: inside 2 se (0.085)
    rows[6]["toy-quality"] = 0.945  # MAR +0.005 quality, se 0.0028: inside 2 se
    c = _by_name(check_claims(rows, COLS))
    assert c["grpo-mix below teacher:geneval on toy-geneval"].passed is False
    assert "needs > 2 se = 0.085" in c["grpo-mix below teacher:geneval on toy-geneval"].detail
    assert c["MAR raises quality"].passed is False
    # without standard errors the same table passes both (exact scores)
    for r in rows:
        del r["se"]
    c = _by_name(check_claims(rows, COLS))
    assert c["grpo-mix below teacher:geneval on toy-geneval"].passed is True
