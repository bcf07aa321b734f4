"""Every numeric value of every recipe config is range-checked when the config loads.

Walks the config dataclasses, so a field added later without a check fails here: each
integer or number set to -1 (lists: [-1, -1]) and each number set to NaN / +-inf must be a
one-line ``UserError`` naming the key. Degenerate settings are refused too.
"""

from __future__ import annotations

import dataclasses
import typing

import pytest

from flowopd.config import load_config
from flowopd.config.awm import AWMConfig
from flowopd.config.crd import CRDConfig
from flowopd.config.grpo import GRPOConfig
from flowopd.config.nft import NFTConfig
from flowopd.config.opd import OPDConfig
from flowopd.config.sft import SFTConfig
from flowopd.errors import UserError

CONFIGS = {
    "grpo": GRPOConfig, "opd": OPDConfig, "crd": CRDConfig, "nft": NFTConfig, "awm": AWMConfig,
    "sft": SFTConfig,
}  # fmt: skip
# values where a negative number is meaningful (a reward weighted down)
SIGNED = {"reward.weights"}


def _numeric_leaves(cls: type, prefix: str = "") -> list[tuple[str, typing.Any]]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = prefix + f.name
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out += _numeric_leaves(tp, key + ".")
        elif typing.get_origin(tp) is not typing.Literal and (
            "int" in str(tp) or "float" in str(tp)
        ):
            out.append((key, tp))
    return out


@pytest.fixture
def base(tmp_path) -> dict[str, list[str]]:
    (tmp_path / "model").mkdir()
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "a cat", "task": "toy"}\n')
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"")
    common = [f"model.path={tmp_path / 'model'}", f"data.train={train}"]
    teachers = f"[{{path: {lora}, tasks: [toy]}}]"
    return {
        "grpo": [*common, "reward=toy_ocr"],
        "opd": [*common, f"opd.teachers={teachers}"],
        "crd": [*common, "reward=toy_ocr"],
        "nft": [*common, "reward=toy_ocr"],
        "awm": [*common, "reward=toy_ocr"],
        "sft": [*common, f"sft.teachers={teachers}", "sample.num_prompts=4",
                "train.batch_size=4"],
    }  # fmt: skip


@pytest.mark.parametrize("algo", list(CONFIGS))
def test_every_numeric_value_is_range_checked(algo, base):
    cls = CONFIGS[algo]
    load_config(cls, None, base[algo])  # the base itself is valid
    leaves = [(k, tp) for k, tp in _numeric_leaves(cls) if k not in SIGNED]
    assert len(leaves) > 20  # the walk found the fields
    accepted = []
    for key, tp in leaves:
        listy = typing.get_origin(tp) in (list, tuple) or "list[" in str(tp)
        bad = ["[-1, -1]"] if listy else ["-1"]
        if "float" in str(tp):
            bad += ["[nan, 0.5]", "[0.5, inf]"] if listy else ["nan", "inf", "-inf"]
        for value in bad:
            try:
                load_config(cls, None, [*base[algo], f"{key}={value}"])
            except UserError as e:
                assert "\n" not in str(e)
                continue
            accepted.append(f"{key}={value}")
    assert not accepted, f"{algo} accepts: {accepted}"


@pytest.mark.parametrize(
    "algo, overrides, needle",
    [
        ("grpo", ["sample.noise_level=0"], "sample.noise_level=0 makes the 'sde' sampler"),
        ("grpo", ["sample.kind=cps", "sample.noise_level=0"], "the 'cps' sampler deterministic"),
        ("opd", ["sample.noise_level=0"], "sample.noise_level=0"),
        ("crd", ["sample.kind=sde", "sample.noise_level=0"], "or sample.kind=ode"),
        ("grpo", ["sample.kind=cps", "sample.noise_level=1.2"], "a must lie in (0, 1]"),
        ("grpo", ["sample.kind=cps", "grpo.kl_form=exact"], "grpo.kl_form=public"),
        ("grpo", ["train.adv_clip=0"], "train.adv_clip must be > 0"),
    ],
)
def test_degenerate_settings_are_rejected_at_load(algo, overrides, needle, base):
    with pytest.raises(UserError) as e:
        load_config(CONFIGS[algo], None, [*base[algo], *overrides])
    assert needle in str(e.value)


def test_valid_neighbours_of_degenerate_settings_load(base):
    load_config(CRDConfig, None, [*base["crd"], "sample.kind=ode", "sample.noise_level=0"])
    load_config(
        GRPOConfig,
        None,
        [*base["grpo"], "sample.kind=cps", "grpo.beta_kl=0", "grpo.kl_form=exact"],
    )  # fmt: skip  (no KL computed)
    load_config(GRPOConfig, None, [*base["grpo"], "sample.kind=cps", "sample.noise_level=1"])
