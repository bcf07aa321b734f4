"""scripts/pass_at_k.py and scripts/grad_snr.py end to end on the tiny pixel model."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import REPO


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pass_at_k_prints_per_category_rates(tiny_pixel_dir, capsys):
    mod = _script("pass_at_k")
    assert mod.main(["--model", str(tiny_pixel_dir), "--n", "6", "--k", "2", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln.split()[1:] for ln in out.splitlines()[2:] if ln.strip()}
    p1, pk = (float(v) for v in lines["overall"][:2])
    assert 0.0 <= p1 <= pk <= 1.0  # pass@1 <= pass@k by definition
    with pytest.raises(SystemExit):
        mod.main(["--k", "1"])


def test_grad_snr_writes_both_estimators(tiny_pixel_dir, tmp_path, capsys):
    mod = _script("grad_snr")
    out = tmp_path / "snr.json"
    argv = ["--model", str(tiny_pixel_dir), "--prompts", "4", "--group-size", "2",
            "--reward", "redness", "--window", "0,2", "--fm", "--json", str(out)]  # fmt: skip
    assert mod.main(argv) == 0
    r = json.loads(out.read_text())
    assert list(r["policy_gradient"]["per_step"]) == ["0", "1"]  # the window's two steps
    assert len(r["flow_matching"]["per_sigma"]) == 10
    assert r["groups_with_variance"] == 4  # a continuous reward varies in every group
    assert "GRPO log-prob, step" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        mod.main(["--window", "3,1"])
