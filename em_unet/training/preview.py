"""A picture of what training sees: augmented crops of a real stack with the membrane mask outlined."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from em_unet.io.files import atomic_output, check_writable
from em_unet.io.stacks import load_labelled_stack, z_context_indices
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
    z_context: int = 1,
    volumetric: bool = False,
) -> Path:
    """Write a PNG grid: for each of ``n_samples`` random crops, the raw crop and three augmentations.

    The membrane mask (1 = membrane) is outlined in colour on every panel, so a
    misalignment between image and mask would show at once. With ``z_context`` K > 1 each crop is shown with its
    z-neighbours: a row of its K sections raw, then two rows of augmentations (one 2-D transform for all
    sections, then the section transforms: z-flip, misaligned slab, missing section, section jitter); the mask
    is outlined on every section of a 3-D U-Net's z-patch (``volumetric``), else on the middle section only, the
    one the 2-D U-Net predicts.
    """
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend stays as it is

    check_writable(output_png, overwrite)
    images, targets = load_labelled_stack(image_path, label_path, label_convention)
    check_patch_size(images.shape, patch_size)
    rng = np.random.default_rng(seed)
    n_variants = 3 if z_context == 1 else 2
    rows_per_sample = 1 if z_context == 1 else 1 + n_variants
    columns = n_variants + 1 if z_context == 1 else z_context
    fig = Figure(figsize=(3 * columns, 3 * n_samples * rows_per_sample))
    axes = fig.subplots(n_samples * rows_per_sample, columns, squeeze=False)
    for sample in range(n_samples):
        z = rng.integers(images.shape[0])
        y = rng.integers(images.shape[1] - patch_size + 1)
        x = rng.integers(images.shape[2] - patch_size + 1)
        sections = z_context_indices(z, images.shape[0], z_context)
        crop = (sections, slice(y, y + patch_size), slice(x, x + patch_size))
        image, mask = images[crop], targets[crop]  # (K, y, x)
        middle = z_context // 2
        if volumetric:
            batch = (np.repeat(image[None, ..., None], n_variants, 0), np.repeat(mask[None, ..., None], n_variants, 0))
        else:
            batch = (
                np.repeat(np.moveaxis(image, 0, -1)[None], n_variants, 0),
                np.repeat(mask[middle][None, ..., None], n_variants, 0),
            )
        augmented, augmented_masks = (a.numpy() for a in augment_batch(*batch, [seed, sample], config))
        if volumetric:
            augmented, augmented_masks = augmented[..., 0], augmented_masks[..., 0]  # (n, K, y, x)
        else:
            augmented = np.moveaxis(augmented, -1, 1)  # (n, K, y, x)
        if z_context == 1:
            panels = [
                [(image[0], mask[0], f"slice {z}, raw")]
                + [(augmented[i, 0], augmented_masks[i, ..., 0], f"augmented {i + 1}") for i in range(n_variants)]
            ]
        else:

            def outline(masks, k, middle=middle):
                return masks[k] if volumetric else (masks[..., 0] if k == middle else None)

            panels = [
                [
                    (image[k], mask[k] if volumetric or k == middle else None, f"section {s}, raw")
                    for k, s in enumerate(sections)
                ]
            ]
            panels += [
                [
                    (augmented[i, k], outline(augmented_masks[i], k), f"augmented {i + 1}, z {k - middle:+d}")
                    for k in range(z_context)
                ]
                for i in range(n_variants)
            ]
        for offset, row_panels in enumerate(panels):
            for ax, (panel, panel_mask, title) in zip(axes[sample * rows_per_sample + offset], row_panels):
                ax.imshow(panel, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                if panel_mask is not None:
                    ax.contour(panel_mask, levels=[0.5], colors="#ff3b30", linewidths=0.6)
                ax.set_title(title, fontsize=9)
                ax.axis("off")
    fig.suptitle("em-unet augmentation preview (red: membrane mask outline)", fontsize=11)
    fig.tight_layout()
    output_png = Path(output_png)
    with atomic_output(output_png, overwrite) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    return output_png
