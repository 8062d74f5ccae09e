"""Pictures of a run: image grids (samples, data) and loss curves, written as PNG.

Uses matplotlib's object API with the Agg canvas (no pyplot, no display, no global backend
switch), so it works on headless machines and inside tests.
"""
from __future__ import annotations

import os

import numpy as np

from .backend import backend_of


def _host(images):
    if hasattr(images, "numpy") and not isinstance(images, np.ndarray):   # a Tensor
        return images.numpy()
    if isinstance(images, np.ndarray):
        return images
    return backend_of(images).to_host(images)


def image_grid(images, nrow=None, padding=2, pad_value=1.0):
    """Tile images into one picture, like torchvision's make_grid.

    Args:
        images: (N, C, H, W) or (N, H, W), values in [0, 1] (clipped), any backend; C is 1 or 3.
        nrow: images per row (default: about sqrt(N)).
        padding: pixels between images; pad_value: their grey level.
    Returns:
        a host float32 array (rows, cols) for one channel or (rows, cols, 3) for three.
    """
    x = np.asarray(_host(images), dtype=np.float32)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"image_grid needs (N, C, H, W) with C = 1 or 3, or (N, H, W); got {x.shape}")
    n, c, h, w = x.shape
    if n == 0:
        raise ValueError("image_grid got no images")
    x = np.clip(np.nan_to_num(x, nan=0.0), 0.0, 1.0)
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol_rows = int(np.ceil(n / nrow))
    grid = np.full((c, ncol_rows * (h + padding) + padding, nrow * (w + padding) + padding),
                   pad_value, np.float32)
    for i in range(n):
        r, q = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, top:top + h, left:left + w] = x[i]
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)


def _atomic_png(path, write):
    """Write a PNG through a temporary file, so a watcher never sees half a picture."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_image_grid(images, path, nrow=None, padding=2, upscale=2):
    """Save ``image_grid(images)`` as a PNG, each pixel repeated ``upscale`` times per side."""
    from matplotlib.image import imsave

    grid = image_grid(images, nrow=nrow, padding=padding)
    if upscale > 1:
        grid = grid.repeat(upscale, axis=0).repeat(upscale, axis=1)
    if grid.ndim == 2:
        return _atomic_png(path, lambda p: imsave(p, grid, cmap="gray", vmin=0.0, vmax=1.0))
    return _atomic_png(path, lambda p: imsave(p, grid))


def plot_losses(path, epoch_losses, step_losses=None, title="training loss", smooth=50):
    """Loss per epoch (right, or alone) and per step with a moving average (left), as a PNG.

    Args:
        epoch_losses: mean loss of each finished epoch (epoch 1, 2, ...).
        step_losses: optional loss of every step (NaN for skipped steps).
        smooth: window of the moving average drawn over the step losses.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = 2 if step_losses is not None and len(step_losses) else 1
    fig = Figure(figsize=(5 * panels, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    if panels == 2:
        ax = axes[0]
        s = np.asarray(step_losses, np.float64)
        steps = np.arange(1, len(s) + 1)
        ax.plot(steps, s, lw=0.5, alpha=0.35, color="tab:blue", label="step")
        k = min(smooth, len(s))
        if k > 1:
            ok = np.isfinite(s)
            csum = np.cumsum(np.where(ok, s, 0.0))
            cnt = np.cumsum(ok)
            avg = (csum[k - 1:] - np.concatenate([[0.0], csum[:-k]])) / np.maximum(
                cnt[k - 1:] - np.concatenate([[0], cnt[:-k]]), 1)
            ax.plot(steps[k - 1:], avg, lw=1.5, color="tab:blue", label=f"mean of {k}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log" if np.nanmin(s) > 0 else "linear")
        ax.legend(loc="upper right")
        ax.set_title(title + " per step")
    ax = axes[-1]
    e = np.asarray(epoch_losses, np.float64)
    ax.plot(np.arange(1, len(e) + 1), e, marker="o", color="tab:red")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean loss")
    ax.set_title(title + " per epoch")
    if len(e):
        ax.set_xlim(0.5, max(len(e), 1) + 0.5)
    ax.grid(alpha=0.3)
    return _atomic_png(path, lambda p: fig.savefig(p, dpi=100, format="png"))


def plot_guidance_sweep(path, weights, accuracies, distances, floor=None, title="guidance sweep"):
    """The quality/diversity trade-off of classifier-free guidance as a PNG: conditional accuracy
    (left axis) and Fréchet distance (right axis, with its train-vs-test floor) against w."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    w = np.asarray(weights, np.float64)
    ax.plot(w, 100 * np.asarray(accuracies, np.float64), marker="o", color="tab:blue")
    ax.set_xlabel("guidance weight w")
    ax.set_ylabel("conditional accuracy (%)", color="tab:blue")
    ax.grid(alpha=0.3)
    right = ax.twinx()
    right.plot(w, distances, marker="s", color="tab:red")
    if floor is not None:
        right.axhline(floor, color="tab:red", ls=":", lw=1, label=f"floor (train vs test) {floor:.1f}")
        right.legend(loc="upper center", fontsize="small")
    right.set_ylabel("Fréchet distance", color="tab:red")
    ax.set_title(title)
    return _atomic_png(path, lambda p: fig.savefig(p, dpi=100, format="png"))
