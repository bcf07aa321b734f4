"""Pre-flight: everything a training run will touch, checked before any model loads.

``check_run(algo, cfg, world_size)`` reads what the run reads (prompt files, benchmark
prompt files, LoRA headers of teachers / anchor / init, the model's configs), finds the
weights each reward and benchmark scorer needs, checks the distributed layout, and returns
a :class:`RunPlan`: what one epoch and the whole run do, and warnings for what only the
launch machine can settle (a hub id not in this machine's cache). Every problem is one
``UserError`` naming the file or key and the fix. ``flowopd check`` prints the plan with
``flowopd estimate``'s memory/time figures; ``flowopd train`` runs the same checks first,
so a run that would fail at its first evaluation fails in seconds instead.

No weights are loaded: model architectures come from ``transformer/config.json`` (or a
known hub id, ``perf.KNOWN_ARCHS``), LoRA files are read as safetensors headers only.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowopd.errors import UserError, closest

__all__ = ["RunPlan", "check_run", "check_prompt_file", "check_lora_header", "weights_status"]


@dataclass
class RunPlan:
    """What ``check_run`` found: labelled plan rows, in order, and warnings."""

    algo: str
    world_size: int
    rows: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    latent_shape: tuple[int, int, int] | None = None  # (C, h, w) at model.resolution
    architecture: Any = None  # (perf.MMDiTArch, perf.PipelineShape) when known

    def add(self, label: str, text: str) -> None:
        self.rows.append((label, text))

    def warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)

    def format(self) -> str:
        width = max((len(k) for k, _ in self.rows), default=0) + 2
        lines = [f"{k:<{width}}{v}" for k, v in self.rows]
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings])


def check_run(algo: str, cfg: Any, world_size: int = 1) -> RunPlan:
    """Validate everything the ``algo`` run of ``cfg`` touches on ``world_size`` processes.

    ``cfg`` is an already loaded and validated config (``load_config``). Raises
    ``UserError`` on the first problem; returns the plan otherwise.
    """
    if world_size < 1:
        raise UserError(f"the number of processes must be >= 1, got {world_size}")
    cfg.check_distributed(world_size)
    plan = RunPlan(algo, world_size)
    _plan_model(plan, cfg)
    records = _plan_data(plan, cfg)
    _check_routing(cfg, records)
    _plan_rewards(plan, cfg, records)
    _plan_adapters(plan, cfg)
    _plan_epoch(plan, cfg)
    _plan_eval(plan, cfg)
    _plan_output(plan, cfg)
    return plan


# --------------------------------------------------------------------------------------
# model


def _plan_model(plan: RunPlan, cfg: Any) -> None:
    """Architecture, resolution -> latent shape (C, h, w) and image tokens per row."""
    from flowopd import perf
    from flowopd.paths import resolve_model_path

    m = cfg.model
    path = resolve_model_path(m.path)
    local = Path(path).expanduser()
    if local.is_dir() and not (local / "model_index.json").is_file():
        raise UserError(
            f"model.path '{m.path}' holds no model_index.json; pass a diffusers pipeline "
            "directory (saved with save_pretrained) or a hub id"
        )
    source = path  # where the architecture is read: a directory, or a known hub id
    if not local.is_dir():
        status = weights_status(path)
        if status == "cached":
            source = _cached_snapshot(path) or path
        else:
            plan.warn(
                f"model.path {path} is {status}: the run downloads it at launch (fails "
                f"when HF_HUB_OFFLINE=1); fetch it first with `hf download {path}`"
            )
    try:
        arch, shape = perf.load_architecture(source, m.max_sequence_length)
    except (OSError, ValueError, KeyError) as e:  # a malformed config.json
        raise UserError(
            f"model.path '{m.path}': unreadable model config ({e}); fix the directory"
        ) from None
    except UserError as e:
        if local.is_dir():
            raise
        plan.warn(f"latent shape unknown: {e}")
        plan.add("model", f"{path} (backend {m.backend}, {m.dtype})")
        return
    native = arch.sample_size * shape.vae_scale
    res = m.resolution or native
    mult = shape.vae_scale * arch.patch_size
    if res % mult:
        raise UserError(
            f"model.resolution={res} must be a multiple of {mult} for {path} (VAE scale "
            f"{shape.vae_scale} x patch {arch.patch_size}); e.g. model.resolution="
            f"{max(mult, res - res % mult)}"
        )
    side = res // shape.vae_scale
    if arch.pos_embed_max_size and side // arch.patch_size > arch.pos_embed_max_size:
        largest = arch.pos_embed_max_size * arch.patch_size * shape.vae_scale
        raise UserError(
            f"model.resolution={res} needs {side // arch.patch_size} patches per side, more "
            f"than the model's positional table ({arch.pos_embed_max_size}); use at most {largest}"
        )
    plan.latent_shape = (arch.in_channels, side, side)
    plan.architecture = (arch, shape)
    tokens = perf.image_tokens(arch, res, shape.vae_scale)
    plan.add(
        "model",
        f"{path} (backend {m.backend}, {m.dtype}; {arch.num_layers}"
        + (f" + {arch.num_single_layers} single" if getattr(arch, "num_single_layers", 0) else "")
        + " blocks, "
        f"{perf.si(perf.transformer_params(arch))}params)",
    )
    where = "model.resolution" if m.resolution else "native, model.resolution=null"
    plan.add(
        "resolution",
        f"{res} px ({where}) -> latents {arch.in_channels}x{side}x{side}, {tokens} image "
        f"tokens per row",
    )


# --------------------------------------------------------------------------------------
# prompt files


def check_prompt_file(path: str, key: str) -> None:
    """One-line errors for a prompt file that is missing, a directory, binary or not UTF-8
    (before a reader meets it); '' and ``world:TASK`` are generated in memory."""
    if not path or path.startswith("world:"):
        return
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"{key}: '{path}' is a directory; give the prompt file")
    if not p.is_file():
        raise UserError(f"{key}: prompt file '{path}' not found; fix the path")
    data = p.read_bytes()
    if b"\x00" in data[:4096]:
        raise UserError(
            f"{key}: '{path}' is a binary file, not a text prompt file; point {key} at "
            "the prompts (JSONL, or one prompt a line)"
        )
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{key}: '{path}' is not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8"
        ) from None


def _records(key: str, path: str, read: Any) -> list[dict]:
    """``read()`` after the file checks; an empty result is an error naming the file."""
    check_prompt_file(path, key)
    records = read()
    if not records:
        raise UserError(f"{key}: '{path}' holds no prompts; fill it or fix the path")
    return records


def _data_files(cfg: Any) -> list[tuple[str, str, str]]:
    """(key, path, reward name or '') of every training prompt file."""
    d = cfg.data
    if d.datasets:
        return [(f"data.datasets.{i}.path", x.path, x.reward) for i, x in enumerate(d.datasets)]
    return [("data.train", d.train, "")]


def _plan_data(plan: RunPlan, cfg: Any) -> dict[str, list[dict]]:
    """Read every training prompt file; rows with counts and tasks. Returns {key: records}."""
    from flowopd.rollouts import load_datasets

    files = _data_files(cfg)
    for key, path, _ in files:
        check_prompt_file(path, key)
    loaded, _ = load_datasets(cfg.data)  # the recipes' own loader: the records a run trains on
    out: dict[str, list[dict]] = {}
    per_epoch = cfg.prompts_per_process(1)  # prompts per epoch (SFT: sample.num_prompts)
    for (key, path, _), recs in zip(files, loaded, strict=True):
        if not recs:
            raise UserError(f"{key}: '{path}' holds no prompts; fill it or fix the path")
        out[key] = recs
        tasks = sorted({str(r.get("task", "-")) for r in recs})
        plan.add(key, f"{path}: {len(recs)} prompts (tasks: {', '.join(tasks)})")
        if len(recs) < per_epoch and not cfg.data.datasets:
            plan.warn(
                f"{key} holds {len(recs)} prompts, fewer than the {per_epoch} drawn per "
                "epoch: prompts repeat within an epoch"
            )
    return out


def _check_routing(cfg: Any, records: dict[str, list[dict]]) -> None:
    """Every prompt of an OPD / SFT run must have its teacher; routed rewards their task."""
    section = getattr(cfg, "opd", None) or getattr(cfg, "sft", None)
    if section is not None:
        from flowopd.recipes.teachers import check_tasks  # the recipes' own routing check

        check_tasks(list(records.values()), section.teacher_of(), section.routing_key)
    reward = getattr(cfg, "reward", None)
    if reward is not None and reward.routing:
        _each_routed(records, "task", reward.routing, "reward.routing")


def _each_routed(
    records: dict[str, list[dict]], key: str, table: dict[str, str], where: str
) -> None:
    for file_key, recs in records.items():
        for i, r in enumerate(recs):
            value = r.get(key)
            if value not in table:
                what = f"has no '{key}'" if value is None else f"has {key} '{value}'"
                raise UserError(
                    f"{file_key}: prompt {i + 1} {what}, which {where} does not serve "
                    f"(it serves {', '.join(sorted(table))}); add it there or fix the record"
                )


# --------------------------------------------------------------------------------------
# rewards and benchmark scorers


# The options of each built-in reward that name model weights (a local path or a hub id;
# the aesthetic head is a file); their defaults come from the reward's factory.
_WEIGHT_OPTIONS: dict[str, tuple[str, ...]] = {
    "geneval": ("detector", "clip_model"),
    "pickscore": ("model", "processor"),
    "clip_score": ("model", "processor"),
    "aesthetic": ("head", "clip_model"),
}


def weights_status(path: str) -> str:
    """'local' (an existing path), 'cached' (a hub id with a snapshot in this machine's
    Hugging Face cache) or 'not in the local Hugging Face cache'."""
    if Path(path).expanduser().exists():
        return "local"
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / ("models--" + path.replace("/", "--")) / "snapshots"
    cached = repo.is_dir() and any(repo.iterdir())
    return "cached" if cached else "not in the local Hugging Face cache"


def _cached_snapshot(repo: str) -> str | None:
    """The local snapshot directory of a cached hub id (nothing downloaded), or None."""
    try:
        from huggingface_hub import constants, snapshot_download

        return snapshot_download(repo, local_files_only=True, cache_dir=constants.HF_HUB_CACHE)
    except Exception:  # an incomplete cache entry: fall back to the known architectures
        return None


def _factory(name: str):
    from flowopd.rewards.base import _BUILTIN, REWARDS

    if name not in REWARDS and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    return REWARDS.get(name)


def _reward_uses(cfg: Any) -> dict[str, str]:
    """{reward name: where it is configured} of the rewards the run builds."""
    uses: dict[str, str] = {}
    section = getattr(cfg, "reward", None)
    if section is not None:
        for n in section.names():
            uses.setdefault(n, "reward")
    for key, _, name in _data_files(cfg):
        if name:
            uses.setdefault(name, key.replace(".path", ".reward"))
    return uses


def _plan_rewards(plan: RunPlan, cfg: Any, records: dict[str, list[dict]]) -> None:
    options = getattr(getattr(cfg, "reward", None), "options", {}) or {}
    for name, where in _reward_uses(cfg).items():
        text = _check_scorer(plan, name, options.get(name, {}), where)
        plan.add(f"reward {name}", text)
    _check_records_fit(cfg, records)


def _check_scorer(plan: RunPlan, name: str, opts: dict, where: str) -> str:
    """Check a reward's options and the weights they name; a one-line summary."""
    if name.startswith("remote:"):
        url = name.removeprefix("remote:")
        if not url.startswith(("http://", "https://")):
            raise UserError(f"{where}: '{name}' needs an http(s) URL: remote:http://HOST:PORT")
        return f"served at {url} (not contacted by the check)"
    factory = _factory(name)
    if factory is None:  # names were checked at config load; keep the message anyway
        from flowopd.errors import unknown
        from flowopd.rewards.base import available_rewards

        raise unknown("reward", name, available_rewards())
    params = dict(inspect.signature(factory).parameters)
    if name == "geneval":  # the rest of its options go to the transformers detector
        from flowopd.rewards.geneval import TransformersDetector

        params.pop("detector_options")
        extra = inspect.signature(TransformersDetector.__init__).parameters
        params.update({k: v for k, v in extra.items() if k not in ("self", "model")})
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in opts:
        if key not in params and not open_kwargs:
            raise UserError(
                f"reward.options.{name}.{key}: not an option of the '{name}' reward"
                f"{closest(key, params)}; valid: {', '.join(params)}"
            )
    if name == "ocr":
        return _check_ocr_backend(opts.get("backend", params["backend"].default))
    parts = []
    for key in _WEIGHT_OPTIONS.get(name, ()):
        value = opts.get(key, params[key].default if key in params else None)
        if value is None or not isinstance(value, (str, os.PathLike)):
            if key == "head":
                raise UserError(
                    f"reward.options.{name}.head is required: the path of the LAION "
                    "aesthetic MLP (sac+logos+ava1-l14-linearMSE.pth)"
                )
            continue
        if key == "clip_model" and name == "geneval" and opts.get("colors", "clip") != "clip":
            continue
        parts.append(f"{key} {value} ({_check_weights(plan, name, key, str(value))})")
    return ", ".join(parts) or "no weights"


def _check_weights(plan: RunPlan, name: str, key: str, value: str) -> str:
    status = weights_status(value)
    path_like = value.startswith((".", "/", "~")) or value.count("/") != 1
    if status != "local" and path_like:
        raise UserError(
            f"reward.options.{name}.{key}: '{value}' not found; pass an existing local "
            "path or a hub id org/name"
        )
    if status not in ("local", "cached"):
        plan.warn(
            f"{name} reward: {key} {value} is {status}: the run downloads it at launch "
            f"(fails when HF_HUB_OFFLINE=1); `hf download {value}` or set "
            f"reward.options.{name}.{key}=DIR"
        )
    return status


def _check_ocr_backend(backend: str) -> str:
    from flowopd.rewards.ocr import ENGINES

    if backend not in ENGINES:
        from flowopd.errors import unknown

        raise unknown("OCR backend", backend, ENGINES)
    module = {"rapidocr": "rapidocr_onnxruntime", "tesseract": "pytesseract"}[backend]
    if importlib.util.find_spec(module) is None:
        raise UserError(
            f"the '{backend}' OCR backend needs the {module} package: pip install 'flowopd[ocr]'"
        )
    return f"backend {backend} (installed)"


def _check_records_fit(cfg: Any, records: dict[str, list[dict]]) -> None:
    """GenEval-scored prompts need GenEval metadata; OCR-scored prompts a quoted target."""
    from flowopd.rewards.ocr import extract_target

    section = getattr(cfg, "reward", None)
    for key, _, own in _data_files(cfg):
        name = own or (section.name if section is not None else "")
        if name == "geneval":
            from flowopd.rewards.geneval import _check_metadata

            for i, r in enumerate(records[key]):
                _check_metadata(dict(r), f"{key} prompt {i + 1}")
        elif name == "ocr":
            for i, r in enumerate(records[key]):
                if not (r.get("target") or r.get("text") or extract_target(r["prompt"])):
                    raise UserError(
                        f"{key}: prompt {i + 1} has no target text for the ocr reward (in "
                        f"double quotes, or a 'target' field): {r['prompt'][:60]!r}"
                    )


def _plan_eval(plan: RunPlan, cfg: Any) -> None:
    """Benchmarks: read each prompt file, check its scorer's weights; the cadence."""
    from flowopd.eval.benchmarks import benchmark_records

    names = cfg.eval.resolved_benchmarks(cfg.data.test)
    epochs, every = cfg.train.epochs, cfg.eval.every
    if not names:
        plan.add("eval", "none (eval.benchmarks is empty)")
        return
    at = [e for e in range(1, epochs + 1) if (every and e % every == 0) or e == epochs]
    shown = ", ".join(map(str, at[:6])) + (", ..." if len(at) > 6 else "")
    cadence = f"every {every} epochs and after the last" if every else "after the last epoch"
    plan.add("eval", f"{cadence}: {len(at)} evaluation(s), at epoch {shown or '-'}")
    options = getattr(getattr(cfg, "reward", None), "options", {}) or {}
    for name in names:
        base, _, path = name.partition("=")
        key = f"eval.benchmarks ({base})"
        recs = _records(key, path, lambda n=name: benchmark_records(n, cfg.eval.num_prompts))
        text = f"{len(recs)} prompts" + (f" from {path}" if path else "")
        if not base.startswith("toy-") and _factory(base) is not None:  # a real scorer
            text += "; scorer " + _check_scorer(plan, base, options.get(base, {}), key)
        plan.add(f"benchmark {base}", text)


# --------------------------------------------------------------------------------------
# adapters, epoch layout, outputs


def check_lora_header(path: str, key: str, arch: Any = None) -> int:
    """Tensors in a LoRA's safetensors file, read from its JSON header (no tensor loaded);
    a one-line ``UserError`` naming the file when it is not a readable safetensors file, or
    (given the model's ``perf.MMDiTArch``) when it was trained on another architecture."""
    from flowopd.config.opd import LORA_WEIGHTS, check_lora_path
    from flowopd.models.adapters import read_safetensors_header

    check_lora_path(path, key)
    p = Path(path).expanduser()
    f = p if p.is_file() else p / LORA_WEIGHTS
    header = read_safetensors_header(f, key)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if not tensors:
        raise UserError(f"{key}: '{f}' holds no tensors; re-export the LoRA")
    if arch is not None:
        _check_lora_fits(tensors, arch, f"{key}: LoRA '{path}'")
    return len(tensors)


_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.")


def _check_lora_fits(tensors: dict[str, dict], arch: Any, what: str) -> None:
    """Every adapted block exists in the model, and every attention factor has the model's
    width d = heads x head_dim (lora_A: (r, d), lora_B: (d, r)), SD3.5-M: 24 blocks, 1536."""
    width = arch.num_attention_heads * arch.attention_head_dim
    for name, info in tensors.items():
        m = _BLOCK.search(name)
        if m and int(m.group(1)) >= arch.num_layers:
            raise UserError(
                f"{what} adapts transformer block {m.group(1)}, but the model has "
                f"{arch.num_layers}; use adapters trained on this model.path"
            )
        shape = info.get("shape", []) if isinstance(info, dict) else []
        if ".attn" not in name or len(shape) != 2:
            continue
        d = shape[1] if "lora_A" in name else shape[0] if "lora_B" in name else width
        if d != width:
            raise UserError(
                f"{what} has width {d} ({name}), the model {width}; it was trained on "
                "another architecture: use adapters trained on this model.path"
            )


def _plan_adapters(plan: RunPlan, cfg: Any) -> None:
    section = getattr(cfg, "opd", None) or getattr(cfg, "sft", None)
    if section is None:
        return
    name = "opd" if hasattr(cfg, "opd") else "sft"
    arch = plan.architecture[0] if plan.architecture else None
    for t in section.teachers:
        n = check_lora_header(t.path, f"teacher '{t.adapter}'", arch)
        plan.add(f"teacher {t.adapter}", f"{t.path} ({n} tensors) for {', '.join(t.tasks)}")
    for attr in ("anchor", "init"):
        path = getattr(section, attr, "")
        if path:
            n = check_lora_header(path, f"{name}.{attr}", arch)
            plan.add(f"{name}.{attr}", f"{path} ({n} tensors)")


def _plan_epoch(plan: RunPlan, cfg: Any) -> None:
    W, s, t = plan.world_size, cfg.sample, cfg.train
    if hasattr(s, "group_size"):  # GRPO / OPD / CRD
        per = cfg.images_per_process(W)
        plan.add(
            "epoch",
            f"{s.prompts_per_epoch} prompts x {s.group_size} images = "
            f"{cfg.images_per_epoch} images ({per} per process, {W} process(es))",
        )
        window = f", SDE window {s.sde_window_size}" if s.sde_window_size else ""
        noise = "" if s.kind == "ode" else f", noise level {s.noise_level}"
        plan.add(
            "sampling",
            f"{s.num_steps} {s.kind} steps{noise}{window}, "
            f"{'guidance' if cfg.model.backend == 'flux' else 'CFG'} {cfg.model.guidance_scale}; "
            f"{per // s.batch_size} micro-batch(es) of {s.batch_size} per process",
        )
        trained = _trained(cfg)
        acc = cfg.gradient_accumulation_steps(W)
        steps = cfg.optimizer_steps_per_epoch(W)
        plan.add(
            "training",
            f"{trained}; minibatch {cfg.train_batch_size}, {acc} per optimizer step, "
            f"{steps} optimizer step(s) per epoch x {t.epochs} epochs = {steps * t.epochs}",
        )
    else:  # SFT: teachers' samples once, then epochs over them
        per = cfg.images_per_process(W)
        plan.add(
            "data",
            f"{s.num_prompts} prompts x {s.images_per_prompt} teacher images "
            f"({per} per process, {W} process(es)), {s.num_steps} ODE steps",
        )
        steps = per // t.batch_size // t.gradient_accumulation
        plan.add(
            "training",
            f"minibatch {t.batch_size}, {t.gradient_accumulation} per optimizer step, {steps} "
            f"optimizer step(s) per epoch x {t.epochs} epochs = {steps * t.epochs}",
        )


def _trained(cfg: Any) -> str:
    from flowopd.config.times import training_times_of

    method = training_times_of(cfg)  # CRD, NFT, AWM: a grid of forward-process times
    if method is not None:
        return f"{method.times_used} of {method.grid_size} training times per image"
    return f"{cfg.trained_steps} of {cfg.sample.num_steps} steps trained per trajectory"


def _plan_output(plan: RunPlan, cfg: Any) -> None:
    o = cfg.output
    out = Path(o.dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"output.dir '{o.dir}' is a file; choose a directory (--out DIR)")
    parent = next((p for p in [out, *out.parents] if p.exists()), None)
    if parent is not None and not os.access(parent, os.W_OK):
        raise UserError(f"output.dir '{o.dir}': '{parent}' is not writable; choose another --out")
    ckpts = out / "checkpoints"
    if ckpts.is_dir() and any(ckpts.iterdir()) and not o.resume:
        plan.warn(
            f"{o.dir} holds checkpoints of an earlier run: --resume continues it, otherwise "
            "the new run writes over them"
        )
    every = f"every {o.checkpoint_every} epochs and " if o.checkpoint_every else ""
    plan.add("output", f"{o.dir} (checkpoints {every}at the end, keep {o.keep_last or 'all'})")
