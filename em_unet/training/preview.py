"""A picture of what training sees: augmented crops of a real stack with the membrane mask outlined."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from em_unet.io.files import atomic_output, check_writable
from em_unet.io.stacks import load_labelled_stack
from em_unet.training.augment import AugmentConfig, augment_batch
from em_unet.training.data import check_patch_size


def augment_preview(
    image_path: str | Path,
    label_path: str | Path,
    output_png: str | Path,
    n_samples: int = 6,
    patch_size: int = 256,
    seed: int = 0,
    config: AugmentConfig | None = None,
    label_convention: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Write a PNG grid: for each of ``n_samples`` random crops, the raw crop and three augmentations.

    The membrane mask (1 = membrane) is outlined in colour on every panel, so a
    misalignment between image and mask would show at once.
    """
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend stays as it is

    check_writable(output_png, overwrite)
    images, targets = load_labelled_stack(image_path, label_path, label_convention)
    check_patch_size(images.shape, patch_size)
    rng = np.random.default_rng(seed)
    n_variants = 3
    fig = Figure(figsize=(3 * (n_variants + 1), 3 * n_samples))
    axes = fig.subplots(n_samples, n_variants + 1, squeeze=False)
    for row in range(n_samples):
        z = rng.integers(images.shape[0])
        y = rng.integers(images.shape[1] - patch_size + 1)
        x = rng.integers(images.shape[2] - patch_size + 1)
        image = images[z, y : y + patch_size, x : x + patch_size]
        mask = targets[z, y : y + patch_size, x : x + patch_size]
        batch_images = np.repeat(image[None, ..., None], n_variants, axis=0)
        batch_masks = np.repeat(mask[None, ..., None], n_variants, axis=0)
        augmented, augmented_masks = augment_batch(batch_images, batch_masks, [seed, row], config)
        panels = [(image, mask, f"slice {z}, raw")] + [
            (augmented[i, ..., 0].numpy(), augmented_masks[i, ..., 0].numpy(), f"augmented {i + 1}")
            for i in range(n_variants)
        ]
        for ax, (panel, panel_mask, title) in zip(axes[row], panels):
            ax.imshow(panel, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.contour(panel_mask, levels=[0.5], colors="#ff3b30", linewidths=0.6)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.suptitle("em-unet augmentation preview (red: membrane mask outline)", fontsize=11)
    fig.tight_layout()
    output_png = Path(output_png)
    with atomic_output(output_png, overwrite) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    return output_png
