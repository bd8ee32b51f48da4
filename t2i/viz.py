"""Pictures a person would rather look at: labelled sample grids and loss curves (PNG)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from t2i.io import atomic_write  # noqa: E402


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [−1, 1] -> RGB PIL image."""
    array = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def fit_cell(image: Image.Image, cell: int) -> tuple[Image.Image, tuple[int, int]]:
    """`image` scaled (nearest neighbour) so its longer side is `cell` px, keeping its aspect ratio, and
    the offset that centres it in a cell × cell square. A square image fills the cell at offset (0, 0)."""
    w, h = image.size
    scale = cell / max(w, h)
    size = (max(1, min(cell, round(w * scale))), max(1, min(cell, round(h * scale))))
    return image.resize(size, Image.NEAREST), ((cell - size[0]) // 2, (cell - size[1]) // 2)


def save_grid(images, labels: list[str], path: Path, cols: int = 4, cell: int = 160) -> Path:
    """A grid of images, each captioned with its label. `images`: one [N, 3, H, W] tensor, or a list of
    [3, H, W] tensors of different sizes (e.g. samples of two aspect-ratio buckets). Each image is scaled
    with nearest neighbour to fit a `cell` px square, keeping its aspect ratio, and centred in it on white
    (letterboxed); a square image fills its cell."""
    font = ImageFont.load_default(size=11)
    rows = (len(images) + cols - 1) // cols
    text_h = 44
    sheet = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, label) in enumerate(zip(images, labels)):
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        fitted, (dx, dy) = fit_cell(to_pil(img), cell)
        sheet.paste(fitted, (x + dx, y + dy))
        lines = textwrap.wrap(label, width=cell // 6)[:3]
        draw.multiline_text((x + 3, y + cell + 2), "\n".join(lines), fill="black", font=font, spacing=1)
    return atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))


def smoothing_window(n: int) -> int:
    """Steps in the running mean of a loss curve of n steps: ~2% of a long run (18 of 900), at least 5
    steps once the run has 20 (a 100-step run: 5), never more than a quarter of the run; 1 (no
    smoothing) below 8 steps. A fixed 2% was 1 on every run under 100 steps ("mean of 1")."""
    return max(1, n // 50, min(5, n // 4))


def plot_loss(records: list[dict], path: Path, title: str = "training loss") -> Path:
    """Per-step loss (faint) and its running mean (bold; window: smoothing_window)."""
    steps = np.array([r["step"] for r in records])
    loss = np.array([r["loss"] for r in records], dtype=float)
    window = smoothing_window(len(loss))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if window > 1:
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(steps, loss, alpha=0.3, lw=0.8, label="per step")
        ax.plot(steps[window - 1:], smooth, lw=2, label=f"running mean over {window} steps")
    else:  # too few steps to smooth: the per-step loss, drawn plainly
        ax.plot(steps, loss, lw=1.5, marker="o", ms=3, label="per step")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return Path(path)
