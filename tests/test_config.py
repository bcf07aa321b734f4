"""Typed configs: YAML + overrides, coercion, error messages, and GRPOConfig's checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from flowopd.config import (
    apply_overrides,
    config_from_dict,
    config_help,
    dump_config,
    load_config,
)
from flowopd.config.grpo import GRPOConfig
from flowopd.errors import UserError

REPO = Path(__file__).resolve().parents[1]


# -- a small config exercising every supported annotation -------------------------------


@dataclass
class Inner:
    lr: float = field(default=3e-4, metadata={"help": "learning rate"})
    steps: int = field(default=10, metadata={"help": "steps"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "betas"})


@dataclass
class Item:
    path: str = ""
    weight: float = 1.0


@dataclass
class Toy:
    name: str = field(default="run", metadata={"help": "a name"})
    kind: Literal["sde", "cps"] = field(default="sde", metadata={"help": "sampler"})
    flag: bool = True
    size: int | None = None
    tags: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    items: list[Item] = field(default_factory=list)
    train: Inner = field(default_factory=Inner)

    def validate(self) -> None:
        if self.train.steps < 1:
            raise UserError("train.steps must be >= 1")


def _write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_yaml_and_overrides_round_trip(tmp_path):
    p = _write(
        tmp_path,
        "name: base\nkind: cps\ntags: [a, b]\nweights: {ocr: 1, geneval: 0.5}\n"
        "items:\n  - {path: x.jsonl}\n  - {path: y.jsonl, weight: 2}\n"
        "train:\n  lr: 1e-4\n  betas: [0.8, 0.99]\n",
    )
    cfg = load_config(
        Toy,
        p,
        [
            "train.steps=7",
            "size=12",
            "flag=false",
            "name=2024",  # a str field keeps the text, not the int
            "items.1.weight=3",
            "tags=[c]",
        ],
    )
    assert cfg.name == "2024" and cfg.kind == "cps" and cfg.flag is False and cfg.size == 12
    assert cfg.train.lr == 1e-4  # PyYAML reads '1e-4' as a string: coerced to float
    assert cfg.train.steps == 7 and cfg.train.betas == (0.8, 0.99)
    assert cfg.weights == {"ocr": 1.0, "geneval": 0.5}
    assert isinstance(cfg.weights["ocr"], float)
    assert cfg.items == [Item("x.jsonl", 1.0), Item("y.jsonl", 3.0)]
    assert cfg.tags == ["c"]
    # dump -> load gives the same object back
    again = load_config(Toy, _write(tmp_path, dump_config(cfg), "dumped.yaml"))
    assert again == cfg


def test_defaults_without_file_and_scalar_to_list():
    cfg = load_config(Toy, None, ["tags=solo", "size=null", "name='a: b'"])
    assert cfg.tags == ["solo"] and cfg.size is None and cfg.train == Inner()
    assert cfg.name == "a: b"


def test_overrides_do_not_mutate_the_original():
    cfg = load_config(Toy)
    other = apply_overrides(cfg, ["train.lr=0.5"])
    assert cfg.train.lr == 3e-4 and other.train.lr == 0.5


def test_unknown_key_suggests_closest():
    with pytest.raises(UserError, match=r"unknown config key 'train.lrr' \(did you mean 'lr'\?\)"):
        load_config(Toy, None, ["train.lrr=1"])
    # a section key given at the top level points to its section
    with pytest.raises(UserError, match=r"did you mean 'train.steps'\?"):
        load_config(Toy, None, ["steps=1"])


def test_unknown_key_in_yaml_names_file(tmp_path):
    p = _write(tmp_path, "train:\n  setps: 3\n")
    with pytest.raises(UserError) as e:
        load_config(Toy, p)
    msg = str(e.value)
    assert "'train.setps'" in msg and "did you mean 'steps'" in msg and str(p) in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.steps=abc", "'train.steps' expects an integer"),
        ("train.steps=1.5", "'train.steps' expects an integer"),
        ("train.lr=fast", "'train.lr' expects a number"),
        ("flag=maybe", "'flag' expects true or false"),
        ("train.betas=[0.9]", "'train.betas' expects 2 values"),
        ("weights=[1, 2]", "'weights' expects dict"),
        ("items.0.path=x", "'items' is a list of 0 item"),
        ("train=3", "'train' must be a mapping"),
        ("train.lr", "must look like key=value"),
    ],
)
def test_type_errors_name_the_key(override, needle):
    with pytest.raises(UserError, match=None) as e:
        load_config(Toy, None, [override])
    assert needle in str(e.value), str(e.value)


def test_literal_suggests_choice():
    with pytest.raises(
        UserError, match=r"'kind' has unknown value 'sdee' \(did you mean 'sde'\?\)"
    ):
        load_config(Toy, None, ["kind=sdee"])


def test_validate_hook_runs_and_can_be_skipped():
    with pytest.raises(UserError, match="train.steps must be >= 1"):
        load_config(Toy, None, ["train.steps=0"])
    assert load_config(Toy, None, ["train.steps=0"], validate=False).train.steps == 0


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(Toy, tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="invalid YAML at line 2"):
        load_config(Toy, _write(tmp_path, "name: a\n  kind: [\n"))
    with pytest.raises(UserError, match="must hold a mapping"):
        load_config(Toy, _write(tmp_path, "- a\n- b\n", "list.yaml"))


def test_extends_merges_sections_and_replaces_lists(tmp_path):
    (tmp_path / "shared").mkdir()
    _write(
        tmp_path / "shared", "name: root\ntags: [a, b]\ntrain: {lr: 0.1, steps: 3}\n", "root.yaml"
    )
    _write(tmp_path, "extends: shared/root.yaml\nkind: cps\ntrain: {steps: 5}\n", "mid.yaml")
    leaf = _write(tmp_path, "extends: mid.yaml\ntags: [c]\n", "leaf.yaml")
    cfg = load_config(Toy, leaf, ["train.lr=0.2"])
    # train merged key by key through two levels, the list replaced, overrides last
    assert (cfg.name, cfg.kind, cfg.tags) == ("root", "cps", ["c"])
    assert (cfg.train.lr, cfg.train.steps) == (0.2, 5)


def test_extends_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="extends 'gone.yaml', which is not a file"):
        load_config(Toy, _write(tmp_path, "extends: gone.yaml\n", "a.yaml"))
    with pytest.raises(UserError, match=r"extends loops \(b.yaml -> c.yaml -> b.yaml\)"):
        _write(tmp_path, "extends: b.yaml\n", "c.yaml")
        load_config(Toy, _write(tmp_path, "extends: c.yaml\n", "b.yaml"))
    with pytest.raises(UserError, match="extends must be a file path, got 3"):
        load_config(Toy, _write(tmp_path, "extends: 3\n", "d.yaml"))
    with pytest.raises(UserError, match="unknown config key 'nmae'"):
        _write(tmp_path, "nmae: x\n", "typo.yaml")  # the inherited file's keys are checked
        load_config(Toy, _write(tmp_path, "extends: typo.yaml\n", "e.yaml"))


def test_config_help_lists_fields():
    text = config_help(Toy)
    assert "train.lr: float = 0.0003" in text and "learning rate" in text
    assert "kind: 'sde'|'cps' = sde" in text
    assert "items.N.path: str" in text


# -- GRPOConfig --------------------------------------------------------------------------


@pytest.fixture
def data_files(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "a cat", "task": "toy"}\n')
    test = tmp_path / "test.jsonl"
    test.write_text('{"prompt": "a dog", "task": "toy"}\n')
    return train, test


@pytest.fixture
def base_overrides(data_files, tmp_path):
    train, test = data_files
    model = tmp_path / "model"
    model.mkdir()
    return [
        f"model.path={model}",
        f"data.train={train}",
        f"data.test={test}",
        "reward=toy_ocr",
    ]


def test_grpo_defaults_are_the_paper_values(base_overrides):
    cfg = load_config(GRPOConfig, None, base_overrides)
    assert cfg.reward.name == "toy_ocr" and cfg.reward.mode == "single"  # shorthand
    assert (cfg.model.lora.rank, cfg.model.lora.alpha, cfg.model.guidance_scale) == (32, 64, 4.5)
    assert (cfg.sample.num_steps, cfg.sample.eval_num_steps, cfg.sample.noise_level) == (
        10,
        40,
        0.7,
    )
    assert (cfg.train.lr, cfg.grpo.clip_range, cfg.grpo.beta_kl) == (3e-4, 1e-4, 0.04)
    assert cfg.grpo.kl_form == "public"


def test_grpo_derived_values(base_overrides):
    cfg = load_config(GRPOConfig, None, base_overrides)
    assert cfg.images_per_epoch == 48 * 24
    assert cfg.trained_steps == 9  # int(10 * 0.99)
    assert cfg.train_batch_size == 24  # falls back to sample.batch_size
    # 8 processes: 6 prompts x 24 images = 144 each, 6 minibatches, accumulate 3 -> 2 steps
    assert cfg.images_per_process(8) == 144
    assert cfg.sampling_batches(8) == 6
    assert cfg.gradient_accumulation_steps(8) == 3
    assert cfg.optimizer_steps_per_epoch(8) == 2
    # one process: 48 minibatches, accumulate 24 -> still 2 optimizer steps
    assert cfg.gradient_accumulation_steps(1) == 24 and cfg.optimizer_steps_per_epoch(1) == 2
    fast = apply_overrides(cfg, ["sample.sde_window_size=3", "train.inner_epochs=2"])
    assert fast.trained_steps == 3 and fast.optimizer_steps_per_epoch(1) == 4
    explicit = apply_overrides(cfg, ["train.gradient_accumulation=4", "train.batch_size=8"])
    # 1152 / 8 = 144 minibatches / 4 = 36 steps
    assert explicit.minibatches_per_pass(1) == 144 and explicit.optimizer_steps_per_epoch(1) == 36


def _error(overrides: list[str]) -> str:
    with pytest.raises(UserError) as e:
        load_config(GRPOConfig, None, overrides)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_grpo_batch_not_dividing_the_epoch(base_overrides):
    msg = _error([*base_overrides, "sample.batch_size=25"])
    assert "sample.batch_size=25 must divide the images each process samples" in msg
    assert "48 / 1 x 24 = 1152" in msg
    msg = _error([*base_overrides, "train.batch_size=7"])
    assert "train.batch_size=7" in msg
    msg = _error([*base_overrides, "train.optimizer_steps_per_epoch=5"])
    assert "optimizer_steps_per_epoch=5 must divide the minibatches" in msg


def test_grpo_check_distributed(base_overrides):
    cfg = load_config(GRPOConfig, None, base_overrides)
    cfg.check_distributed(8)
    with pytest.raises(UserError, match=r"prompts_per_epoch=48 must be divisible by the num"):
        cfg.check_distributed(5)
    with pytest.raises(UserError, match="use 45 or 50"):
        cfg.check_distributed(5)
    # 16 processes: 3 prompts x 24 = 72 images, 3 minibatches of 24 cannot make 2 steps
    with pytest.raises(UserError, match="optimizer_steps_per_epoch=2 must divide"):
        cfg.check_distributed(16)


def test_grpo_group_size_below_two(base_overrides):
    assert "sample.group_size must be >= 2" in _error([*base_overrides, "sample.group_size=1"])


def test_grpo_unknown_reward_suggests(base_overrides):
    msg = _error([*base_overrides, "reward=toy_ocrr"])
    assert "reward.name: unknown reward 'toy_ocrr' (did you mean 'toy_ocr'?)" in msg
    msg = _error([*base_overrides[:-1], "reward.weights={toy_ocr: 1, toy_qualty: 0.5}"])
    assert "reward.weights.toy_qualty" in msg and "did you mean 'toy_quality'" in msg


def test_grpo_missing_model_path(base_overrides):
    msg = _error([o for o in base_overrides if not o.startswith("model.path")])
    assert msg.startswith("missing model path")
    assert "does not exist and is not a hub id" in _error([*base_overrides, "model.path=./nope/x"])
    # a hub id is accepted without a local directory
    load_config(GRPOConfig, None, [*base_overrides, "model.path=org/name"])


def test_grpo_other_checks(base_overrides):
    assert "grpo.timestep_fraction must be in (0, 1]" in _error(
        [*base_overrides, "grpo.timestep_fraction=1.5"]
    )
    assert "sde_window_range [0, 12]" in _error(
        [*base_overrides, "sample.sde_window_size=2", "sample.sde_window_range=[0, 12]"]
    )
    assert "does not fit" in _error(
        [*base_overrides, "sample.sde_window_size=4", "sample.sde_window_range=[0, 3]"]
    )
    assert "missing reward" in _error(base_overrides[:-1])
    assert "only one of reward.name, reward.weights" in _error(
        [*base_overrides, "reward.routing={a: toy_ocr}"]
    )
    assert "prompt file" in _error([*base_overrides, "data.test=/nonexistent.jsonl"])


def test_grpo_mix_datasets(data_files, base_overrides):
    train, test = data_files
    cfg = config_from_dict(
        GRPOConfig,
        {
            "model": {"path": "org/name"},
            "data": {
                "datasets": [
                    {"path": str(train), "reward": "toy_geneval"},
                    {"path": str(test), "reward": "toy_ocr", "name": "ocr"},
                ],
                "mix_ratio": [3, 1],
            },
        },
    )
    assert cfg.data.epoch_schedule() == [0, 0, 0, 1]
    assert [cfg.data.dataset_for_epoch(e) for e in range(6)] == [0, 0, 0, 1, 0, 0]
    assert cfg.data.datasets[0].label == "train" and cfg.data.datasets[1].label == "ocr"
    with pytest.raises(UserError, match="mix_ratio has 1 entries for 2 datasets"):
        apply_overrides(cfg, ["data.mix_ratio=[1]"]).data.validate()


@pytest.mark.parametrize("teacher", ["grpo_geneval", "grpo_ocr"])
def test_toy_grpo_mix_shares_the_teachers_settings(teacher):
    """GRPO-Mix is the specialists' recipe on the mixed data: a like-for-like baseline for
    the Flow-OPD table's "mixing loses to each specialist" claim, not a handicapped one."""
    from dataclasses import asdict

    def sections(name: str) -> dict:
        cfg = load_config(GRPOConfig, REPO / "configs" / "toy" / f"{name}.yaml", validate=False)
        return {k: v for k, v in asdict(cfg).items() if k not in ("data", "reward", "output")}

    assert sections("grpo_mix") == sections(teacher)


@pytest.mark.parametrize("name", ["grpo_geneval", "grpo_ocr", "grpo_pickscore"])
def test_sd35m_presets(name, data_files):
    path = REPO / "configs" / "sd35m" / f"{name}.yaml"
    cfg = load_config(GRPOConfig, path, validate=False)
    assert cfg.model.path == "stabilityai/stable-diffusion-3.5-medium"
    assert cfg.images_per_epoch == 1152 and cfg.trained_steps == 9
    assert cfg.optimizer_steps_per_epoch(8) == 2 and cfg.gradient_accumulation_steps(8) == 3
    assert cfg.reward.name == name.removeprefix("grpo_")
    cfg.check_distributed(8)
    from flowopd.rewards.base import available_rewards

    if cfg.reward.name not in available_rewards():
        pytest.skip(f"reward '{cfg.reward.name}' not registered yet")
    train, test = data_files
    load_config(GRPOConfig, path, [f"data.train={train}", f"data.test={test}"])


def test_dump_resolved_grpo_config_round_trips(base_overrides, tmp_path):
    cfg = load_config(GRPOConfig, None, [*base_overrides, "train.betas=[0.8, 0.9]"])
    p = _write(tmp_path, dump_config(cfg), "config.yaml")
    assert load_config(GRPOConfig, p) == cfg
    assert "sample.group_size: int = 24" in config_help(GRPOConfig)


def test_sd35m_pickscore_preset_has_flow_grpos_settings():
    cfg = load_config(
        GRPOConfig, REPO / "configs" / "sd35m" / "grpo_pickscore.yaml", validate=False
    )
    # Flow-GRPO's pickscore_sd3: KL 0.01 (0.04 for GenEval/OCR), the rest as the GenEval preset
    assert cfg.reward.name == "pickscore" and cfg.grpo.beta_kl == 0.01
    assert (cfg.model.resolution, cfg.model.guidance_scale, cfg.sample.noise_level) == (
        512,
        4.5,
        0.7,
    )
    assert (cfg.sample.group_size, cfg.sample.prompts_per_epoch, cfg.train.lr) == (24, 48, 3e-4)
    assert cfg.data.train.endswith(".txt")  # the published plain prompt file
    assert cfg.eval.benchmarks == ["pickscore"]  # scored on data.test: DrawBench
    assert cfg.data.test == "data/drawbench/test.txt"


def test_sd35m_opd_names_only_teachers_with_presets():
    from flowopd.config.opd import OPDConfig

    presets = REPO / "configs" / "sd35m"
    made = {}  # adapter dir a preset writes -> preset
    for path in presets.glob("grpo_*.yaml"):
        cfg = load_config(GRPOConfig, path, validate=False)
        made[f"{cfg.output.dir}/lora"] = path.name
    opd = load_config(OPDConfig, presets / "opd.yaml", validate=False)
    needed = [t.path for t in opd.opd.teachers] + [opd.opd.anchor]
    assert all(p in made for p in needed), (needed, made)
    assert made["runs/sd35m_grpo_pickscore/lora"] == "grpo_pickscore.yaml"
