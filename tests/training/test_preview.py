import numpy as np
from PIL import Image

from em_unet.training.preview import augment_preview


def test_preview_png_from_real_stack(isbi_dir, tmp_path):
    out = augment_preview(
        isbi_dir / "train-volume.tif",
        isbi_dir / "train-labels.tif",
        tmp_path / "p.png",
        n_samples=2,
        patch_size=128,
        seed=1,
    )
    with Image.open(out) as image:
        pixels = np.asarray(image.convert("RGB")).astype(int)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 600
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 120) & (pixels[..., 2] < 120)
    assert red.sum() > 500  # the mask outlines are drawn
