"""Run set-up shared by the training recipes: processes, output dir, model + adapter,
gradient averaging, the trained adapter's optimiser / EMA / checkpoints, the epoch's log.

With ``model.finetune: full`` the trained "adapter" is the whole transformer, sharded with
FSDP2 over the processes (engine/full.py says how and why); ``Run.full`` marks it and
``TrainState`` takes parameters, state and the final save from there.

Imports nothing above the engine: rewards from config are ``flowopd.rewards.combine.
build_reward``, the periodic evaluation is ``flowopd.eval.periodic``."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowopd.config import dump_config
from flowopd.engine import distributed as dist
from flowopd.models import load_model
from flowopd.models.base import FlowModel
from flowopd.paths import resolve_model_path

# ModelConfig switches passed to the backend's from_pretrained when set (see config/sections.py)
SPEED_OPTIONS = (
    "gradient_checkpointing", "compile", "offload_text_encoders", "cfg_forward",
    "max_sequence_length",
)  # fmt: skip


@dataclass
class Run:
    model: FlowModel
    out: Path
    world: int
    rank: int
    main: bool
    accelerator: Any = None
    history: list[dict] = field(default_factory=list)
    full: bool = False  # model.finetune == "full": the transformer itself trains

    def log(self, msg: str) -> None:
        if self.main:
            print(msg, flush=True)


def setup_run(cfg, adapter: str | None, *, model: FlowModel | None = None) -> Run:
    """Processes (accelerate; CPU under torchrun works), output dir with the resolved
    config, the model on this process's device and a fresh trainable LoRA ``adapter``."""
    from flowopd.engine.logging import quiet_libraries

    quiet_libraries()
    acc = dist.setup_accelerator()
    world, rank = acc.num_processes, acc.process_index
    cfg.check_distributed(world)
    out = Path(cfg.output.dir)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".config.yaml.tmp"
        tmp.write_text(dump_config(cfg))
        os.replace(tmp, out / "config.yaml")
    if model is None:
        model = load_model(
            resolve_model_path(cfg.model.path),
            backend=cfg.model.backend,
            device=acc.device,
            dtype=cfg.model.dtype,
            # memory/speed options (every recipe's model: section has them)
            **{k: getattr(cfg.model, k) for k in SPEED_OPTIONS if getattr(cfg.model, k)},
        )
    # sampling, training and evaluation all run at model.resolution (None: the native side)
    model.set_resolution(cfg.model.resolution)
    full = adapter is not None and getattr(cfg.model, "finetune", "lora") == "full"
    if full:
        from flowopd.engine.full import prepare_full

        # the frozen KL reference only when the recipe's loss uses one (GRPO: beta_kl > 0)
        prepare_full(model, reference=getattr(cfg, "uses_reference", True), world=world)
    elif adapter is not None:
        torch.manual_seed(cfg.train.seed)  # the LoRA A init is random: same on every process
        lora = cfg.model.lora
        model.add_adapter(
            adapter, rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules,
            init=lora.init if lora.init != "default" else True,
        )  # fmt: skip
        model.set_adapter(adapter, trainable=True)
    return Run(
        model=model, out=out, world=world, rank=rank, main=acc.is_main_process,
        accelerator=acc, full=full,
    )  # fmt: skip


def reduce_gradients(params: list[nn.Parameter], world: int) -> None:
    """Average the LoRA gradients over processes (what DDP does, for the trained params only)."""
    if world <= 1:
        return
    import torch.distributed as tdist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    tdist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).clone()
        offset += n


class TrainState:
    """What a recipe optimises and checkpoints: one trainable adapter's optimiser, EMA,
    non-finite guard and step counter, plus frozen adapters saved alongside (snapshots).

    One object so every recipe shares the exact same step / checkpoint / resume logic.
    """

    def __init__(self, run: Run, adapter: str, train_cfg, snapshots: tuple[str, ...] = ()) -> None:
        from flowopd.engine.ema import EMA, flowgrpo_decay
        from flowopd.engine.guard import NonFiniteGuard
        from flowopd.engine.optim import make_optimizer

        t = train_cfg
        self.run, self.adapter, self.snapshots, self.cfg = run, adapter, snapshots, t
        if run.full:
            from flowopd.engine.full import full_parameters

            self.params = full_parameters(run.model)
        else:
            self.params = run.model.adapter_parameters(adapter)
        self.opt = make_optimizer(
            self.params,
            t.lr,
            tuple(t.betas),
            t.weight_decay,
            eight_bit=t.adamw_8bit,
        )
        self.ema = (
            EMA(self.params, flowgrpo_decay(t.ema_decay), every=t.ema_every) if t.ema else None
        )
        self.guard = NonFiniteGuard(t.max_nonfinite)
        self.opt_steps = 0

    def start(self, resume: bool):
        """The run's ``RunLogger`` (writing on the main process) and the first epoch to
        train: after the latest checkpoint when ``resume``, the log cut back to it."""
        from flowopd.engine.logging import RunLogger

        logger = RunLogger(self.run.out, enabled=self.run.main)
        start_epoch = self.resume(resume)
        logger.truncate_from(start_epoch)
        return logger, start_epoch

    def finish(self, logger) -> None:
        """Save the final adapter (``save_final``) and close the log."""
        self.save_final()
        logger.close()

    def resume(self, enabled: bool) -> int:
        """Restore the latest checkpoint of the run (when ``enabled``); returns the start epoch."""
        from flowopd.engine.checkpoint import latest_checkpoint, load_checkpoint

        ckpt = latest_checkpoint(self.run.out) if enabled else None
        if ckpt is None:
            return 0
        state = load_checkpoint(ckpt)
        model = self.run.model
        if self.run.full:
            self._load_full(state)
        else:
            model.load_adapter_state_dict(self.adapter, state["lora"])
            for name in self.snapshots:
                model.load_adapter_state_dict(name, state[name])
            self.opt.load_state_dict(state["optimizer"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
        self.guard.load_state_dict(state["guard"])
        self.opt_steps = state["opt_steps"]
        self.run.log(f"resumed from {ckpt} (epoch {state['epoch']})")
        return state["epoch"] + 1

    def _load_full(self, state: dict) -> None:
        """Full fine-tuning's consolidated checkpoint into the (sharded) model, AdamW, EMA."""
        from flowopd.engine import full as fu

        transformer = self.run.model.transformer
        fu.load_model_state(transformer, state["full"])
        fu.load_optimizer_state(transformer, self.opt, state["optimizer"])
        if self.ema is not None:
            fu.load_shadow(self.ema, state["ema"])

    def _full_state(self) -> dict:
        """Consolidated full-fine-tuning state (collective; complete on the main process)."""
        from flowopd.engine import full as fu

        transformer = self.run.model.transformer
        state = {
            "full": fu.model_state(transformer),
            "optimizer": fu.optimizer_state(transformer, self.opt),
        }
        if self.ema is not None:
            state["ema"] = fu.shadow_state(self.ema)
        return state

    def step(self, last_loss: torch.Tensor) -> float:
        """Average gradients over processes, clip, step unless non-finite, EMA, zero grads.

        Returns the gradient norm before clipping (over all shards when sharded: the
        DTensor norm is all-reduced). Sharded full fine-tuning needs no averaging here:
        FSDP's backward reduce-scatters the gradients averaged over processes."""
        t = self.cfg
        if not (self.run.full and self.run.world > 1):
            reduce_gradients(self.params, self.run.world)
        if t.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, t.max_grad_norm)
        else:
            grad_norm = torch.sqrt(
                sum((p.grad.float() ** 2).sum() for p in self.params if p.grad is not None)
            )
        if self.run.full:
            from flowopd.engine.full import to_full

            grad_norm = to_full(grad_norm)
        if self.guard.check(last_loss.detach(), self.params):
            self.opt.step()
            self.opt_steps += 1
            if self.ema is not None:
                self.ema.step()
        self.opt.zero_grad(set_to_none=True)
        return float(grad_norm)

    def checkpoint(self, epoch: int, output_cfg, *, last: bool) -> None:
        """Atomic checkpoint every ``output.checkpoint_every`` epochs and at the end."""
        from flowopd.engine.checkpoint import save_checkpoint

        every = output_cfg.checkpoint_every
        due = bool((every and (epoch + 1) % every == 0) or last)
        # full fine-tuning gathers its shards on every process (a collective)
        full = self._full_state() if due and self.run.full else None
        if self.run.main and due:
            model = self.run.model
            state = {"epoch": epoch, "opt_steps": self.opt_steps, "guard": self.guard.state_dict()}
            if full is not None:
                state.update(full)
            else:
                state["lora"] = model.adapter_state_dict(self.adapter)
                state["optimizer"] = self.opt.state_dict()
                state.update({name: model.adapter_state_dict(name) for name in self.snapshots})
                if self.ema is not None:
                    state["ema"] = self.ema.state_dict()
            save_checkpoint(self.run.out, epoch + 1, state, keep_last=output_cfg.keep_last or None)
        dist.barrier()

    def save_final(self) -> None:
        """The trained adapter to ``OUT/lora`` (diffusers format; EMA weights when EMA is on);
        full fine-tuning: the transformer to ``OUT/transformer`` (a diffusers model dir)."""
        from contextlib import nullcontext

        if self.run.full:
            from flowopd.engine.full import save_transformer

            with self.ema.swapped(self.params) if self.ema is not None else nullcontext():
                out = self.run.out / "transformer"
                save_transformer(self.run.model.transformer, out, main=self.run.main)
        elif self.run.main:
            with self.ema.swapped(self.params) if self.ema is not None else nullcontext():
                self.run.model.save_adapter(self.adapter, self.run.out / "lora")
        dist.barrier()


def end_epoch(
    run: Run,
    cfg,
    ts: TrainState,
    logger,
    epoch: int,
    record: dict,
    evaluate: Callable[[Run, Any, TrainState, int], dict[str, float]] | None = None,
) -> None:
    """Add ``evaluate(run, cfg, ts, epoch)``'s metrics to the epoch's record (the recipes
    pass ``flowopd.eval.periodic.evaluate_when_due``: the engine imports no evaluation),
    log it, keep it in the history, checkpoint."""
    if evaluate is not None:
        record.update(evaluate(run, cfg, ts, epoch))
    logger.log(epoch, record)
    run.history.append({"epoch": epoch, **record})
    ts.checkpoint(epoch, cfg.output, last=epoch + 1 == cfg.train.epochs)
