"""The training loop shared by the neural models (SCALE, scMVP): DDP, early stopping,
gradient clipping, mixed precision, checkpoints and logging.

A module to train is any ``nn.Module`` whose ``forward(x, cols=, offsets=, values=,
generator=g, step=t)`` returns the batch's mean loss: ``x`` is the dense batch, ``cols`` /
``offsets`` / ``values`` the same batch in CSR pieces (for a sparse first layer), ``t`` lets it
schedule (e.g. a KL warm-up), and ``g`` is a ``torch.Generator`` seeded by ``(seed, step, rank)``, so the noise of
every step is the same in a resumed run as in an uninterrupted one.

Stopping (SCALE's rule): at most ``max_iter`` optimisation steps, and early stopping when the
epoch's mean loss has not improved for ``patience`` epochs, but not before ``min_iter`` steps. The epoch loss is reduced over
all ranks, so every rank stops at the same step.

Progress (rank 0, on stderr): steps done, cells/s and an ETA both to the early-stopping floor
and to ``max_iter``, from a moving average of the step time (:mod:`.progress`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import InputError
from .alloc import retain_freed_memory
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, start_fresh
from .data import ShardedStream
from .dist import DistEnv
from .progress import ProgressBar

logger = logging.getLogger("scatac_dist")

__all__ = ["TrainConfig", "fit", "step_generator"]


@dataclass
class TrainConfig:
    """Options of :func:`fit`.

    ``batch_size`` is the global batch (split over the ranks). ``checkpoint_every`` steps
    (0: never) a checkpoint goes to ``checkpoint_dir``; ``resume`` continues from its newest.
    A run that does not resume takes the folder over: the step files an earlier run left there
    are removed before training (:func:`.checkpoint.start_fresh`). ``fingerprint`` (plain
    values: the data and the parameters that decide the computation) is stored in every
    checkpoint, and a resume from a checkpoint with another fingerprint is refused.
    ``amp`` (default: on for CUDA) runs the forward pass in bfloat16 autocast.
    ``retain_memory`` keeps each step's freed host buffers in the heap for the next step
    (glibc; :mod:`.alloc`).
    The learning rate of step ``t`` is ``max(lr * lr_decay ** (t // lr_decay_every), lr_min)``
    (constant with the default ``lr_decay = 1``).
    """

    batch_size: int = 32
    max_iter: int = 30_000
    lr: float = 2e-4
    lr_decay: float = 1.0
    lr_decay_every: int = 10
    lr_min: float = 0.0
    weight_decay: float = 5e-4
    patience: int = 10
    min_iter: int = 0
    clip_norm: float = 10.0
    seed: int = 0
    device: str = "cpu"
    amp: bool | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    fingerprint: dict | None = None
    log_path: str | None = None
    log_every: int = 100
    progress: bool = True
    buffer_chunks: int = 4
    retain_memory: bool = True


def step_generator(device: torch.device, seed: int, step: int, rank: int) -> torch.Generator:
    """The generator of one step's noise: a function of (seed, step, rank) only."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) * 4099 + rank)
    return g


def _clip(module: nn.Module, max_norm: float) -> None:
    """``clip_grad_norm_``'s rule, but the gradients are only rescaled when the norm is over
    ``max_norm`` (torch multiplies them by 1.0 otherwise: a full pass over every gradient,
    10 ms a step for SCALE's first layer on Leukemia)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if float(total) > max_norm:
        torch._foreach_mul_(grads, max_norm / (float(total) + 1e-6))


def _allreduce(values: list[float], env: DistEnv, device) -> list[float]:
    if not env.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def fit(module: nn.Module, stream: ShardedStream, cfg: TrainConfig, env: DistEnv | None = None) -> dict:
    """Train ``module`` on ``stream`` in this process (one rank of the job when ``env`` is distributed).

    Returns a summary: ``history`` (per-epoch mean loss), ``steps``, ``epochs``,
    ``stopped_early``, ``train_seconds``, ``cells_per_s`` (cells over all ranks, per second
    of this run's training, excluding set-up) and ``start_step`` (0, or the step a resumed
    run went on from).

    Raises
    ------
    InputError
        On resume, when the checkpoint's fingerprint differs from ``cfg.fingerprint``.
    """
    env = env or DistEnv()
    device = torch.device(cfg.device)
    module.to(device)
    model = module
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
    # fused: one kernel for all parameters (5x faster than the per-tensor loop on CPU, measured)
    opt = torch.optim.Adam(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                           fused=device.type in ("cpu", "cuda"))
    amp = (device.type == "cuda") if cfg.amp is None else cfg.amp
    st = {"step": 0, "epoch": 0, "step_in_epoch": 0, "best": math.inf, "bad_epochs": 0,
          "epoch_sum": 0.0, "epoch_n": 0.0, "history": [], "stopped_early": False}
    if cfg.resume:
        if not cfg.checkpoint_dir:
            raise ValueError("resume needs a checkpoint folder (--checkpoint-dir)")
        ck_path = latest_checkpoint(cfg.checkpoint_dir)
        ck = load_checkpoint(ck_path if ck_path is not None else cfg.checkpoint_dir)
        if cfg.fingerprint is not None and ck.get("fingerprint") not in (None, cfg.fingerprint):
            raise InputError(ck_path, "this checkpoint was written for other data or other parameters",
                             "resume with the data and parameters of the run that wrote it, or start fresh "
                             "in another --checkpoint-dir")
        module.load_state_dict(ck["module"])
        opt.load_state_dict(ck["optimizer"])
        st.update(ck["trainer"])
        # judged again under this run's rule: a resume with a larger budget or a later min_iter
        # goes on training instead of inheriting the earlier run's stop (same rule: same stop)
        st["stopped_early"] = bool(st["bad_epochs"] >= cfg.patience and st["step"] >= cfg.min_iter)
        if env.rank != 0:  # the partial epoch sum was reduced into rank 0's copy
            st["epoch_sum"], st["epoch_n"] = 0.0, 0.0
        logger.info("resumed from step %d (epoch %d)", st["step"], st["epoch"])
    elif cfg.checkpoint_dir and cfg.checkpoint_every and env.rank == 0:
        start_fresh(cfg.checkpoint_dir)  # this run owns the folder: an earlier run's steps must go
    log = open(cfg.log_path, "a") if (cfg.log_path and env.rank == 0) else None  # noqa: SIM115
    # one bar, in rank 0: steps, cells/s and the ETA to the early-stopping floor and to max_iter
    bar = ProgressBar(st["step"], cfg.min_iter, cfg.max_iter, stream.batch_size) \
        if cfg.progress and env.rank == 0 else None
    start_step, t0 = st["step"], time.perf_counter()
    steps_per_epoch = stream.steps_per_epoch

    def checkpoint():
        s_sum, s_n = _allreduce([st["epoch_sum"], st["epoch_n"]], env, device)
        if env.rank == 0:
            trainer = {**st, "epoch_sum": s_sum, "epoch_n": s_n}
            save_checkpoint(cfg.checkpoint_dir, {"module": module.state_dict(), "optimizer": opt.state_dict(),
                                                 "trainer": trainer, "config": asdict(cfg),
                                                 "fingerprint": cfg.fingerprint}, st["step"])
        if env.distributed:
            dist.barrier()

    with retain_freed_memory(cfg.retain_memory and device.type == "cpu"):
        try:
            model.train()
            while st["step"] < cfg.max_iter and not st["stopped_early"]:
                for batch in stream.epoch(st["epoch"], start_step=st["step_in_epoch"]):
                    inputs = batch.to_device(device)
                    g = step_generator(device, cfg.seed, st["step"], env.rank)
                    if cfg.lr_decay != 1.0:
                        lr = max(cfg.lr * cfg.lr_decay ** (st["step"] // cfg.lr_decay_every), cfg.lr_min)
                        for group in opt.param_groups:
                            group["lr"] = lr
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                        loss = model(**inputs, generator=g, step=st["step"])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.clip_norm:
                        _clip(module, cfg.clip_norm)
                    opt.step()
                    n = len(batch)
                    st["epoch_sum"] += float(loss.detach()) * n
                    st["epoch_n"] += n
                    st["step"] += 1
                    st["step_in_epoch"] += 1
                    if bar is not None:
                        bar.update(st["step"])
                    if log is not None and cfg.log_every and st["step"] % cfg.log_every == 0:
                        el = time.perf_counter() - t0
                        log.write(json.dumps({"step": st["step"], "epoch": st["epoch"], "loss": float(loss),
                                              "cells_per_s": (st["step"] - start_step) * stream.batch_size / el}) + "\n")
                        log.flush()
                    if cfg.checkpoint_dir and cfg.checkpoint_every and st["step"] % cfg.checkpoint_every == 0:
                        checkpoint()
                    if st["step"] >= cfg.max_iter:
                        break
                if st["step_in_epoch"] >= steps_per_epoch:  # a whole epoch: score it
                    s_sum, s_n = _allreduce([st["epoch_sum"], st["epoch_n"]], env, device)
                    mean = s_sum / max(s_n, 1)
                    st["history"].append(mean)
                    if mean < st["best"] - 1e-12:
                        st["best"], st["bad_epochs"] = mean, 0
                    else:
                        st["bad_epochs"] += 1
                        if st["bad_epochs"] >= cfg.patience and st["step"] >= cfg.min_iter:
                            st["stopped_early"] = True
                    if bar is not None:
                        bar.epoch(st["epoch"], mean)
                    if log is not None:
                        log.write(json.dumps({"epoch": st["epoch"], "step": st["step"], "epoch_loss": mean}) + "\n")
                        log.flush()
                    st["epoch"] += 1
                    st["step_in_epoch"], st["epoch_sum"], st["epoch_n"] = 0, 0.0, 0.0
        finally:
            if bar is not None:
                bar.close()
            if log is not None:
                log.close()
    if cfg.checkpoint_dir and cfg.checkpoint_every:
        checkpoint()
    seconds = time.perf_counter() - t0
    ran = st["step"] - start_step
    return {"history": list(st["history"]), "steps": st["step"], "epochs": st["epoch"],
            "stopped_early": bool(st["stopped_early"]), "train_seconds": seconds,
            "cells_per_s": ran * stream.batch_size / seconds if seconds > 0 else float("nan"),
            "world_size": env.world_size, "start_step": start_step}

