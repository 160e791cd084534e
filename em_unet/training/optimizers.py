"""Optimizers and learning-rate schedules by name: the registries behind ``--optimizer`` and ``--lr-schedule``
(:mod:`em_unet.config` reads the names from here, so adding one is one entry)."""

from __future__ import annotations

import keras


def _constant(learning_rate: float, total_steps: int):
    return learning_rate


def _cosine(learning_rate: float, total_steps: int):
    warmup = max(1, total_steps // 50)
    return keras.optimizers.schedules.CosineDecay(
        0.0, max(1, total_steps - warmup), alpha=0.01, warmup_target=learning_rate, warmup_steps=warmup
    )


# name -> (learning rate, optimizer steps of the run) -> the rate: a number or a Keras schedule of the step
LR_SCHEDULES = {"constant": _constant, "cosine": _cosine}

# name -> (learning rate or schedule, momentum, Keras' common options) -> the Keras optimizer; only SGD takes a
# momentum
OPTIMIZERS = {
    "sgd": lambda rate, momentum, **options: keras.optimizers.SGD(rate, momentum=momentum, **options),
    "adam": lambda rate, momentum, **options: keras.optimizers.Adam(rate, **options),
    "adamax": lambda rate, momentum, **options: keras.optimizers.Adamax(rate, **options),
}


def learning_rate_schedule(learning_rate: float, schedule: str, total_steps: int):
    """``constant``: ``learning_rate`` throughout. ``cosine``: a linear warm-up over the first 2 % of
    ``total_steps`` (optimizer steps), then cosine decay to 1 % of ``learning_rate`` at the last step;
    the warm-up keeps a high peak rate from spiking the loss in the first epochs."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {tuple(LR_SCHEDULES)}, got {schedule!r}")
    return LR_SCHEDULES[schedule](learning_rate, total_steps)


def make_optimizer(name: str, learning_rate, momentum: float = 0.0, ema: float = 0.0) -> keras.optimizers.Optimizer:
    """``learning_rate``: a number or a Keras schedule of the optimizer step; ``ema`` > 0: the optimizer also
    keeps the exponential moving average of the weights with that momentum per step (Keras' ``use_ema``)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {name!r}")
    averaging = {"use_ema": True, "ema_momentum": ema} if ema else {}
    return OPTIMIZERS[name](learning_rate, momentum, **averaging)
