"""Keys a section no longer has: loading one (YAML or override) names where it went.

The objective knobs live in each algorithm's method section (grpo:, opd:, crd:, nft:,
awm:), not in the shared train: section."""

from __future__ import annotations

import pytest

from flowopd.config import load_config
from flowopd.config.awm import AWMConfig
from flowopd.config.crd import CRDConfig
from flowopd.config.grpo import GRPO_KEYS, GRPOConfig
from flowopd.config.nft import NFTConfig
from flowopd.config.opd import OPDConfig
from flowopd.config.sections import RolloutOptimConfig
from flowopd.errors import UserError

MOVED = [
    (GRPOConfig, "train.clip_range", "1.0e-3", "moved to grpo.clip_range"),
    (GRPOConfig, "train.beta_kl", "0.04", "moved to grpo.beta_kl"),
    (GRPOConfig, "train.kl_form", "exact", "moved to grpo.kl_form"),
    (GRPOConfig, "train.adv_std", "group", "moved to grpo.adv_std"),
    (GRPOConfig, "train.timestep_fraction", "0.5", "moved to grpo.timestep_fraction"),
    (OPDConfig, "train.clip_range", "1.0e-4", "moved to opd.clip_range"),
    (OPDConfig, "train.timestep_fraction", "0.99", "moved to opd.timestep_fraction"),
    (OPDConfig, "train.beta_kl", "0.0", "opd.mar_lambda"),
    (OPDConfig, "train.kl_form", "public", "OPD does not use; remove it"),
    (OPDConfig, "train.adv_std", "global", "OPD does not use; remove it"),
    (CRDConfig, "train.beta_kl", "0.1", "CRD's KL weight is crd.beta_kl"),
    (CRDConfig, "train.clip_range", "1.0e-4", "CRD does not use; remove it"),
    (CRDConfig, "train.kl_form", "exact", "CRD does not use; remove it"),
    (CRDConfig, "train.timestep_fraction", "0.99", "CRD does not use; remove it"),
    (CRDConfig, "train.adv_std", "group", "moved to crd.adv_std"),
    (NFTConfig, "train.beta_kl", "1.0e-4", "DiffusionNFT's KL weight is nft.kl_beta"),
    (NFTConfig, "train.clip_range", "1.0e-4", "DiffusionNFT does not use; remove it"),
    (NFTConfig, "train.adv_std", "group", "moved to nft.adv_std"),
    (AWMConfig, "train.beta_kl", "1.0e-3", "AWM's KL weight is awm.kl_beta"),
    (AWMConfig, "train.kl_form", "exact", "AWM does not use; remove it"),
    (AWMConfig, "train.adv_std", "group", "moved to awm.adv_std"),
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


def test_each_objective_lives_in_its_method_section():
    grpo = load_config(GRPOConfig, None, ["grpo.clip_range=1e-3", "grpo.beta_kl=0"], validate=False)
    assert (grpo.grpo.clip_range, grpo.grpo.beta_kl) == (1e-3, 0.0)
    opd = load_config(
        OPDConfig, None, ["opd.clip_range=1e-3", "opd.timestep_fraction=0.5"], validate=False
    )
    assert (opd.opd.clip_range, opd.opd.timestep_fraction) == (1e-3, 0.5)
    crd = load_config(CRDConfig, None, ["crd.adv_std=group"], validate=False)
    assert crd.crd.adv_std == "group"
    # train: is the shared optimiser section in all three (OPD and CRD change a default / help)
    for cfg in (grpo, opd, crd):
        assert isinstance(cfg.train, RolloutOptimConfig)
        assert not any(hasattr(cfg.train, k) for k in GRPO_KEYS)
    assert type(grpo.train) is RolloutOptimConfig


def test_a_moved_key_is_named_at_any_depth_of_a_yaml_section(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1.0e-3\n  clip_range: 1.0e-3\n")
    with pytest.raises(UserError, match=r"^train.clip_range moved to grpo.clip_range \(in "):
        load_config(GRPOConfig, path, validate=False)


def test_an_unknown_key_still_gets_a_suggestion():
    with pytest.raises(UserError, match=r"unknown config key 'train.lrr' \(did you mean 'lr'\?\)"):
        load_config(OPDConfig, None, ["train.lrr=1"], validate=False)
