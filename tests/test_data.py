"""The built-in data and the imagefolder loader (real photos: scikit-learn's bundled sample images)."""

import numpy as np
import pytest
import torch

from fastvit_kernels.data import IMAGENET_MEAN, IMAGENET_STD, ImageFolder, load_digits_split
from fastvit_kernels.train import main


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """Two classes ('china', 'flower') of 64x48 crops from scikit-learn's two sample photos, as JPEG and PNG."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("imagefolder")
    for name, img in zip(["china", "flower"], load_sample_images().images):  # (427, 640, 3) uint8 each
        (root / name).mkdir()
        for i in range(6):
            crop = img[40 * i:40 * i + 48, 60 * i:60 * i + 64]
            Image.fromarray(crop).save(root / name / f"{i}.{'jpg' if i % 2 else 'png'}")
    (root / "china" / "notes.txt").write_text("not an image")
    return root


def test_imagefolder_eval_transform_is_resize_and_centre_crop(image_root):
    from PIL import Image

    ds = ImageFolder(str(image_root), img_size=16, train=False)
    assert ds.classes == ["china", "flower"] and len(ds) == 12
    x, y = ds[7]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 1
    # independent check of sample 7 (flower/1.jpg): shorter side 48 -> int(16 / 0.875) = 18, centre 16x16 crop
    with Image.open(image_root / "flower" / "1.jpg") as im:
        im = im.convert("RGB").resize((24, 18), Image.BILINEAR).crop((4, 1, 20, 17))
        ref = torch.from_numpy(np.asarray(im).copy()).float().permute(2, 0, 1) / 255  # (3, 16, 16)
    ref = (ref - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(x, ref)


def test_imagefolder_train_transform_is_random_but_seeded(image_root):
    ds = ImageFolder(str(image_root), img_size=16, train=True, seed=1)
    a, b = ds[3][0], ds[3][0]
    assert torch.equal(a, b)  # same (seed, epoch, index): same crop
    ds.epoch = 1
    assert not torch.equal(a, ds[3][0])  # a new epoch draws a new crop / flip
    assert torch.isfinite(a).all() and a.shape == (3, 16, 16)


def test_imagefolder_errors(tmp_path):
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolder(str(tmp_path), 16, train=False)


def test_main_job_on_imagefolder(image_root, capsys):
    acc = main(["--data", "imagefolder", str(image_root), "--model", "vit_micro_patch4_32", "--img-size", "16",
                "--steps", "2", "--batch-size", "4", "--workers", "2", "--no-progress", "--backend", "torch"])
    out = capsys.readouterr().out
    assert "data imagefolder: 11 train / 1 held-out images" in out and 0.0 <= acc <= 1.0


def test_digits_split_is_standardised_and_stratified():
    x, y, xt, yt = load_digits_split()
    assert x.shape == (1437, 1, 8, 8) and xt.shape == (360, 1, 8, 8)
    assert abs(x.mean().item()) < 1e-5 and abs(x.std().item() - 1) < 1e-4
    assert torch.bincount(yt).min() >= 35  # every class held out in proportion


def test_data_flag_errors():
    with pytest.raises(SystemExit):
        main(["--data", "imagefolder"])
    with pytest.raises(SystemExit):
        main(["--data", "digits", "/some/path"])
