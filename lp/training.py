"""The one training loop of lp: what offline distillation (KL or MSE) and the LLM-Streamline fits share.

AdamW, an optional cosine schedule to ``min_lr`` over all steps, optional gradient-norm clipping, a guard that
stops at the first non-finite loss and puts back the parameters of the last finite step, and, given a
validation loss per epoch, early stopping with the best epoch's parameters restored.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    steps: int = 0
    history: list[dict] = field(default_factory=list)  # per step: loss, lr
    val: list[float] = field(default_factory=list)  # per epoch, when a validation loss is given
    stopped: str | None = None  # why training stopped early, if it did
    nonfinite: bool = False  # it stopped at a non-finite loss (the last finite parameters are back)
    trained_params: int = 0  # how many parameters were trained (the record states it beside RP and minutes)


def train(params: list[torch.nn.Parameter], batches: Callable[[int], Iterable], loss_of: Callable[[object], torch.Tensor],
          *, steps_per_epoch: int, lr: float, weight_decay: float = 0.0, epochs: int = 1, min_lr: float | None = None,
          clip: float | None = None, validate: Callable[[], float] | None = None, early_stop: int | None = None,
          nonfinite: str = "restore", lr_setting: str = "lr", desc: str = "train", progress: bool = True,
          on_step=None) -> TrainResult:
    """Train ``params`` on ``loss_of(batch)`` for every batch of ``batches(epoch)``, ``epochs`` times.

    ``min_lr`` None: a constant ``lr``; otherwise cosine from ``lr`` to ``min_lr`` over
    ``epochs * steps_per_epoch`` steps. ``clip``: the gradients' total norm is clipped to it. ``validate``:
    called after each epoch; the parameters of the epoch with the lowest value are kept at the end, and with
    ``early_stop`` = k training stops after k epochs without improvement. A non-finite loss: ``nonfinite``
    ``restore`` stops and puts back the last finite step's parameters (``result.stopped`` says so), ``raise``
    raises a ValueError that names ``lr_setting`` (then no copy of the parameters is kept per step). The parameters have
    ``requires_grad`` only while training."""
    if nonfinite not in ("restore", "raise"):
        raise ValueError(f"nonfinite={nonfinite!r} is not one of ['restore', 'raise']")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs * steps_per_epoch, 1), eta_min=min_lr)
             if min_lr is not None else None)
    result = TrainResult()
    snapshot = lambda: [p.detach().clone() for p in params]  # noqa: E731
    good = snapshot() if nonfinite == "restore" else None
    best, best_val, bad_epochs = None, float("inf"), 0

    def put_back(values):
        with torch.no_grad():
            for p, v in zip(params, values):
                p.copy_(v)

    for p in params:
        p.requires_grad_(True)
    try:
        for epoch in range(epochs):
            for batch in tqdm(batches(epoch), desc=f"{desc} epoch {epoch}", disable=not progress):
                loss = loss_of(batch)
                if not torch.isfinite(loss):
                    if good is None:
                        raise ValueError(f"{desc}: the training loss became {loss.item()} at step {result.steps}; "
                                         f"lower {lr_setting} (now {lr:g})")
                    put_back(good)
                    result.nonfinite = True
                    result.stopped = (f"loss became {loss.item()} at step {result.steps}; training stopped and the "
                                      f"parameters restored to the last finite step")
                    log.warning(f"{desc}: {result.stopped}")
                    return result
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, float(clip))
                opt.step()
                if sched is not None:
                    sched.step()
                if good is not None:
                    with torch.no_grad():
                        for p, g in zip(params, good):
                            g.copy_(p)
                result.steps += 1
                result.history.append({"loss": loss.item(), "lr": opt.param_groups[0]["lr"]})
                if on_step:
                    on_step(result.steps, result.history[-1])
            if validate is not None:
                v = validate()
                result.val.append(v)
                if v < best_val:
                    best_val, bad_epochs, best = v, 0, snapshot()
                else:
                    bad_epochs += 1
                    if early_stop and bad_epochs >= early_stop:
                        result.stopped = (f"validation loss did not improve for {early_stop} epochs; the parameters "
                                          f"of the best epoch ({result.val.index(best_val)}) restored")
                        break
        if best is not None:  # keep the epoch with the best validation loss, not the last
            put_back(best)
    finally:
        for p in params:
            p.requires_grad_(False)
    return result


@contextmanager
def restored(params):
    """Put ``params`` back to their current values on exit (distillation may train shared norm weights)."""
    saved = [(p, p.detach().clone()) for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in saved:
                p.copy_(v)
