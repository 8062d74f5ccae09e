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


def save_image_grid(images, path, nrow=None, padding=2, upscale=2, real=None):
    """Save ``image_grid(images)`` as a PNG, each pixel repeated ``upscale`` times per side.

    ``real``: images of the data set drawn beneath the generated ones, in the same layout, below
    a dark band (the report's Fig. 10-11: generated above, ground truth below; for a conditional
    grid the real images of the same classes, row for row)."""
    from matplotlib.image import imsave

    grid = image_grid(images, nrow=nrow, padding=padding)
    if real is not None:
        below = image_grid(real, nrow=nrow or int(np.ceil(np.sqrt(len(_host(images))))),
                           padding=padding)
        if below.ndim != grid.ndim:
            raise ValueError(f"save_image_grid: real images have {1 if below.ndim == 2 else 3} "
                             f"channels, the generated {1 if grid.ndim == 2 else 3}")
        width = max(grid.shape[1], below.shape[1])
        pad = lambda g: np.pad(g, [(0, 0), (0, width - g.shape[1])] + [(0, 0)] * (g.ndim - 2),  # noqa: E731
                               constant_values=1.0)
        band = np.full((3 * padding,) + pad(grid).shape[1:], 0.25, np.float32)
        grid = np.concatenate([pad(grid), band, pad(below)], axis=0)
    if upscale > 1:
        grid = grid.repeat(upscale, axis=0).repeat(upscale, axis=1)
    if grid.ndim == 2:
        return _atomic_png(path, lambda p: imsave(p, grid, cmap="gray", vmin=0.0, vmax=1.0))
    return _atomic_png(path, lambda p: imsave(p, grid))


def _moving_average(s, k):
    """Mean of the last k finite values at each step from k on (NaNs, skipped steps, left out)."""
    ok = np.isfinite(s)
    csum = np.cumsum(np.where(ok, s, 0.0))
    cnt = np.cumsum(ok)
    return (csum[k - 1:] - np.concatenate([[0.0], csum[:-k]])) / np.maximum(
        cnt[k - 1:] - np.concatenate([[0], cnt[:-k]]), 1)


def _per_step_panel(ax, values, smooth, color, ylabel, title):
    s = np.asarray(values, np.float64)
    steps = np.arange(1, len(s) + 1)
    ax.plot(steps, s, lw=0.5, alpha=0.35, color=color, label="step")
    k = min(smooth, len(s))
    if k > 1:
        ax.plot(steps[k - 1:], _moving_average(s, k), lw=1.5, color=color, label=f"mean of {k}")
    finite = s[np.isfinite(s)]
    bad = np.flatnonzero(~np.isfinite(s))
    if len(bad):      # a NaN/Inf step (stopped or skipped) is marked where it happened
        for b in bad[:20]:
            ax.axvline(b + 1, color="black", lw=0.6, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log" if len(finite) and finite.min() > 0 else "linear")
    ax.legend(loc="upper right")
    ax.set_title(title)


def plot_losses(path, epoch_losses, step_losses=None, title="training loss", smooth=50,
                grad_norms=None):
    """Loss per step with a moving average, the gradient norm per step (when given), and the
    mean loss per epoch, side by side, as a PNG. A gradient norm that climbs while the loss
    still looks fine is the early sign of a run about to blow up (the report's CIFAR-10 runs).

    Args:
        epoch_losses: mean loss of each finished epoch (epoch 1, 2, ...).
        step_losses: optional loss of every step (NaN for skipped steps).
        grad_norms: optional global gradient norm of every step (before clipping).
        smooth: window of the moving averages drawn over the per-step curves.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = [(v, c, y, t) for v, c, y, t in (
        (step_losses, "tab:blue", "loss", title + " per step"),
        (grad_norms, "tab:green", "gradient norm", "gradient norm per step"))
        if v is not None and len(v)]
    panels = len(curves) + 1
    fig = Figure(figsize=(5 * panels, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    for ax, (values, color, ylabel, panel_title) in zip(axes, curves):
        _per_step_panel(ax, values, smooth, color, ylabel, panel_title)
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


def plot_nfe_sweep(path, rows, floor=None, title="Fréchet distance against score evaluations"):
    """Sample quality against cost: the Fréchet distance of each sampler (one line each) against
    its score evaluations per sample (log scale), with the train-vs-test floor. ``rows``: dicts
    with ``sampler``, ``nfe``, ``fd``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        mine = sorted((r["nfe"], r["fd"]) for r in rows if r["sampler"] == sampler)
        ax.plot([m[0] for m in mine], [m[1] for m in mine], marker="o", label=sampler)
    if floor is not None:
        ax.axhline(floor, color="black", ls=":", lw=1, label=f"floor (train vs test) {floor:.1f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("score evaluations per sample (NFE)")
    ax.set_ylabel("Fréchet distance")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    ax.set_title(title)
    return _atomic_png(path, lambda p: fig.savefig(p, dpi=100, format="png"))
