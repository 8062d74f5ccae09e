"""Learning-rate schedules: functions of the step number that return a multiplier of the base lr.

    schedule = sequential([linear_warmup(500), cosine(20_000, min_factor=0.1), constant(0.1)],
                          milestones=[500, 20_500])
    scheduler = LRScheduler(optimizer, schedule)   # sets lr = base_lr * schedule(0)
    ...
    optimizer.step(); scheduler.step()             # then lr = base_lr * schedule(1), ...

The closed forms match PyTorch's LinearLR, CosineAnnealingLR and SequentialLR (each later
schedule restarts its own count at its milestone). "Cosine annealing, then constant" is the
schedule the project's source report settled on after its CIFAR-10 runs diverged:
``cosine_then_constant(steps, final_factor)``.
"""
from __future__ import annotations

import bisect
import math


class Schedule:
    """A multiplier as a function of the step (0, 1, 2, ...)."""

    def __call__(self, step):
        raise NotImplementedError


class constant(Schedule):
    def __init__(self, factor=1.0):
        self.factor = float(factor)

    def __call__(self, step):
        return self.factor

    def __repr__(self):
        return f"constant({self.factor})"


class linear_warmup(Schedule):
    """Linear ramp from ``start_factor`` to ``end_factor`` over ``warmup_steps`` steps, then flat
    (PyTorch's LinearLR: start + (end - start) * min(step, n) / n)."""

    def __init__(self, warmup_steps, start_factor=0.0, end_factor=1.0):
        if warmup_steps <= 0:
            raise ValueError(f"linear_warmup: warmup_steps must be positive, got {warmup_steps}")
        self.warmup_steps, self.start_factor, self.end_factor = int(warmup_steps), start_factor, end_factor

    def __call__(self, step):
        frac = min(step, self.warmup_steps) / self.warmup_steps
        return self.start_factor + (self.end_factor - self.start_factor) * frac

    def __repr__(self):
        return f"linear_warmup({self.warmup_steps}, {self.start_factor}, {self.end_factor})"


class cosine(Schedule):
    """Cosine annealing from 1 to ``min_factor`` over ``total_steps`` steps, then flat at
    ``min_factor`` (PyTorch's CosineAnnealingLR with eta_min = min_factor * base_lr, which would
    instead rise again after total_steps)."""

    def __init__(self, total_steps, min_factor=0.0):
        if total_steps <= 0:
            raise ValueError(f"cosine: total_steps must be positive, got {total_steps}")
        self.total_steps, self.min_factor = int(total_steps), float(min_factor)

    def __call__(self, step):
        frac = min(step, self.total_steps) / self.total_steps
        return self.min_factor + (1 - self.min_factor) * (1 + math.cos(math.pi * frac)) / 2

    def __repr__(self):
        return f"cosine({self.total_steps}, min_factor={self.min_factor})"


class sequential(Schedule):
    """``schedules[i]`` from ``milestones[i-1]`` on, each counting its own steps from 0."""

    def __init__(self, schedules, milestones):
        schedules, milestones = list(schedules), [int(m) for m in milestones]
        if len(milestones) != len(schedules) - 1:
            raise ValueError(f"sequential: {len(schedules)} schedules need {len(schedules) - 1} "
                             f"milestones, got {len(milestones)}")
        if milestones != sorted(milestones) or any(m <= 0 for m in milestones):
            raise ValueError(f"sequential: milestones must be positive and increasing, got {milestones}")
        self.schedules, self.milestones = schedules, milestones

    def __call__(self, step):
        i = bisect.bisect_right(self.milestones, step)
        start = self.milestones[i - 1] if i > 0 else 0
        return self.schedules[i](step - start)

    def __repr__(self):
        return f"sequential({self.schedules}, milestones={self.milestones})"


def warmup_then(schedule, warmup_steps, start_factor=0.0):
    """Linear warm-up for ``warmup_steps`` steps, then ``schedule`` (counting from 0)."""
    return sequential([linear_warmup(warmup_steps, start_factor), schedule], [warmup_steps])


def cosine_then_constant(cosine_steps, final_factor):
    """Cosine annealing from 1 to ``final_factor`` over ``cosine_steps``, then ``final_factor``."""
    return sequential([cosine(cosine_steps, final_factor), constant(final_factor)], [cosine_steps])


class LRScheduler:
    """Sets each param group's lr to base_lr * schedule(step); ``step()`` advances by one.

    ``schedule`` may be a Schedule or any callable step -> multiplier.
    """

    def __init__(self, optimizer, schedule):
        if not callable(schedule):
            raise TypeError(f"LRScheduler needs a callable step -> multiplier, got {type(schedule).__name__}")
        self.optimizer, self.schedule = optimizer, schedule
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.last_step = 0
        self._apply()

    def _apply(self):
        factor = self.schedule(self.last_step)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * factor

    def step(self):
        self.last_step += 1
        self._apply()

    def get_last_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self):
        return {"last_step": self.last_step, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state):
        self.last_step = int(state["last_step"])
        self.base_lrs = list(state["base_lrs"])
        self._apply()
