"""Keys a section no longer has: loading one (YAML or override) names where it went."""

from __future__ import annotations

import pytest

from flowopd.config import load_config
from flowopd.config.crd import CRDConfig
from flowopd.config.grpo import GRPOConfig
from flowopd.config.opd import OPDConfig
from flowopd.errors import UserError

MOVED = [
    (OPDConfig, "train.beta_kl", "0.0", "opd.mar_lambda"),
    (OPDConfig, "train.kl_form", "public", "OPD does not use; remove it"),
    (OPDConfig, "train.adv_std", "global", "OPD does not use; remove it"),
    (CRDConfig, "train.beta_kl", "0.1", "CRD's KL weight is crd.beta_kl"),
    (CRDConfig, "train.clip_range", "1.0e-4", "CRD does not use; remove it"),
    (CRDConfig, "train.kl_form", "exact", "CRD does not use; remove it"),
    (CRDConfig, "train.timestep_fraction", "0.99", "CRD does not use; remove it"),
]


@pytest.mark.parametrize("cls, key, value, where", MOVED)
def test_moved_key_as_override(cls, key, value, where):
    with pytest.raises(UserError) as e:
        load_config(cls, None, [f"{key}={value}"], validate=False)
    msg = str(e.value)
    assert msg.startswith(f"{key} ") and where in msg and "\n" not in msg


@pytest.mark.parametrize("cls, key, value, where", MOVED)
def test_moved_key_in_yaml(tmp_path, cls, key, value, where):
    section, name = key.split(".")
    path = tmp_path / "run.yaml"
    path.write_text(f"{section}:\n  {name}: {value}\n")
    with pytest.raises(UserError) as e:
        load_config(cls, path, validate=False)
    msg = str(e.value)
    assert msg.startswith(f"{key} ") and where in msg and str(path) in msg and "\n" not in msg


def test_grpo_keeps_its_objective_in_train():
    cfg = load_config(
        GRPOConfig, None, ["train.clip_range=1e-3", "train.beta_kl=0"], validate=False
    )
    assert (cfg.train.clip_range, cfg.train.beta_kl) == (1e-3, 0.0)


def test_an_unknown_key_still_gets_a_suggestion():
    with pytest.raises(UserError, match=r"unknown config key 'train.lrr' \(did you mean 'lr'\?\)"):
        load_config(OPDConfig, None, ["train.lrr=1"], validate=False)
