"""Watching the process: images followed from noise to data along a sampler (the reverse SDE,
eq. 2 of docs/design.md#eq-2, or its ODE), and real images noised along eq. 1 (docs/design.md#eq-1),
as an animated GIF and as a strip of frames (one column per frame, one row per image).

    frames = Recorder(num_steps, num_frames=12)          # pass frames as a sampler's callback
    sampling.sample("em", score_fn, sde, (4, 1, 28, 28), 500, callback=frames, rng=rng)
    save_gif(frames.frames, "reverse.gif"); save_strip(frames.frames, frames.times, "reverse.png")
    forward = forward_noising(sde, x0, frames.times[::-1], rng)      # eq. 1 at the same times

Frames show x / m(t) (the scaled state, what the data plus noise of level sigma(t) looks like;
for the VE SDE m = 1, x itself) clipped to [0, 1], so a frame at large noise is mostly
saturated noise, exactly as the sampler sees it.
"""
from __future__ import annotations

import numpy as np

from .backend import backend_of
from .plot import _atomic_png, image_grid


def frame_steps(num_steps, num_frames):
    """The step indices (0 .. num_steps - 1) at which to keep a frame: ``num_frames`` of them,
    spaced evenly, always including the last step (the final sample)."""
    if num_frames < 2:
        raise ValueError(f"a trajectory needs at least 2 frames, got {num_frames}")
    keep = np.unique(np.round(np.linspace(0, num_steps - 1, min(num_frames, num_steps))).astype(int))
    return set(int(k) for k in keep)


class Recorder:
    """A sampler callback that keeps host copies of the state at evenly spaced steps (about
    ``num_frames`` of them, the last step always), with their times. Copies to the host only on
    those steps. ``num_steps``: the sampler's steps; None (the ODE, whose steps are the solver's)
    keeps every step and thins at the end."""

    def __init__(self, num_steps, num_frames=12, sde=None):
        self.num_frames, self.sde = int(num_frames), sde
        self.keep = None if num_steps is None else frame_steps(int(num_steps), self.num_frames)
        self.frames, self.times = [], []

    def __call__(self, i, t, x):
        if self.keep is None or i in self.keep:
            self.frames.append(np.asarray(backend_of(x).to_host(x), np.float32))
            self.times.append(float(t))

    def thinned(self):
        """(frames, times) cut to about num_frames (for a callback that kept every step)."""
        if len(self.frames) <= self.num_frames:
            return self.frames, self.times
        idx = sorted(frame_steps(len(self.frames), self.num_frames))
        return [self.frames[i] for i in idx], [self.times[i] for i in idx]


def forward_noising(sde, x0, times, rng):
    """Real images noised along eq. 1 at each time: x(t) = m(t) x0 + std(t) z, with ONE z for
    all times (so the frames show one image drowning, not fresh noise each frame). Host arrays."""
    x0 = np.asarray(x0, np.float32)
    z = np.asarray(rng.standard_normal(x0.shape), np.float32)
    return [np.float32(sde.marginal_mean_coeff(float(t))) * x0
            + np.float32(sde.marginal_std(float(t))) * z for t in times]


def _scaled(frames, times, sde):
    if sde is None:
        return frames
    return [f / np.float32(sde.marginal_mean_coeff(max(float(t), 0.0))) for f, t in zip(frames, times)]


def strip(frames):
    """One picture: a column per frame, a row per image (N images, F frames -> N rows)."""
    frames = [np.asarray(f, np.float32) for f in frames]
    n = frames[0].shape[0]
    stacked = np.stack(frames, axis=1).reshape((n * len(frames),) + frames[0].shape[1:])
    return image_grid(stacked, nrow=len(frames))


def save_strip(frames, path, times=None, sde=None, upscale=2):
    """The frames as a PNG strip (see ``strip``), time running left to right."""
    from matplotlib.image import imsave
    grid = strip(_scaled(frames, times, sde) if times is not None else frames)
    grid = grid.repeat(upscale, axis=0).repeat(upscale, axis=1)
    kw = dict(cmap="gray", vmin=0.0, vmax=1.0) if grid.ndim == 2 else {}
    return _atomic_png(path, lambda p: imsave(p, grid, **kw))


def save_gif(frames, path, times=None, sde=None, nrow=None, duration_ms=120, hold_last_ms=1200,
             upscale=2):
    """The frames as an animated GIF (Pillow, which matplotlib already depends on): each frame a
    grid of the N images; the last frame held for ``hold_last_ms``."""
    import os

    from PIL import Image

    frames = _scaled(frames, times, sde) if times is not None else frames
    pictures = []
    for f in frames:
        g = image_grid(f, nrow=nrow)
        g = (np.clip(g, 0.0, 1.0) * 255).round().astype(np.uint8)
        g = g.repeat(upscale, axis=0).repeat(upscale, axis=1)
        pictures.append(Image.fromarray(g, mode="L" if g.ndim == 2 else "RGB"))
    durations = [duration_ms] * (len(pictures) - 1) + [hold_last_ms]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.gif"
    try:
        pictures[0].save(tmp, save_all=True, append_images=pictures[1:], duration=durations, loop=0)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
