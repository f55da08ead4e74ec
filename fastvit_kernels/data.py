"""Built-in data for the main job, nothing downloaded: scikit-learn's bundled handwritten digits (real images,
1797 8x8 grayscale, 10 classes; UCI Optical Recognition of Handwritten Digits) and a synthetic set of
class templates plus noise (for throughput runs at any image size)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def load_digits_split(img_size: int = 8, in_chans: int = 1, test_fraction: float = 0.2, seed: int = 0):
    """The digits as float tensors, standardised with the training split's mean and std.

    Args:
        img_size: side of the returned images (bilinear resize from 8 when different).
        in_chans: 1, or more to repeat the gray channel (e.g. 3 for RGB models).
        test_fraction: held-out share, stratified by class.
        seed: split seed.

    Returns:
        (x_train (N_train, in_chans, img_size, img_size) fp32, y_train (N_train,) int64, x_test, y_test).

    Raises:
        ImportError: scikit-learn is missing (``pip install scikit-learn``).
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover
        raise ImportError("the digits data needs scikit-learn: pip install scikit-learn") from e
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8), values 0..16
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=test_fraction, random_state=seed, stratify=y.numpy()
    )
    x_train, x_test = x[idx_train], x[idx_test]
    mean, std = x_train.mean(), x_train.std()
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    if img_size != 8:
        x_train = F.interpolate(x_train, size=(img_size, img_size), mode="bilinear", align_corners=False)
        x_test = F.interpolate(x_test, size=(img_size, img_size), mode="bilinear", align_corners=False)
    if in_chans != 1:
        x_train, x_test = x_train.repeat(1, in_chans, 1, 1), x_test.repeat(1, in_chans, 1, 1)
    return x_train, y[idx_train], x_test, y[idx_test]


def synthetic_split(num_classes: int, img_size: int, in_chans: int, n_train: int = 2048, n_test: int = 512,
                    noise: float = 1.0, seed: int = 0):
    """A learnable synthetic set: each class is a fixed random image template; samples add Gaussian noise.

    Returns:
        (x_train (n_train, in_chans, img_size, img_size) fp32, y_train (n_train,) int64, x_test, y_test).
    """
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(num_classes, in_chans, img_size, img_size, generator=g)

    def sample(n):
        y = torch.randint(0, num_classes, (n,), generator=g)
        return templates[y] + noise * torch.randn(n, in_chans, img_size, img_size, generator=g), y

    return (*sample(n_train), *sample(n_test))


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFolder(torch.utils.data.Dataset):
    """Class-per-folder images (``root/<class>/<image>.jpg|png|...``), decoded with Pillow.

    Training transform: random-resized crop (scale 0.08-1, aspect 3/4-4/3, as Inception / timm's default),
    horizontal flip; evaluation: resize the shorter side to img_size / 0.875 and centre-crop img_size. Images are
    returned as (C=3, img_size, img_size) fp32 normalised with the ImageNet mean / std; labels are class indices in
    sorted folder order.

    Raises:
        FileNotFoundError: ``root`` has no class folder with images.
    """

    def __init__(self, root: str, img_size: int, train: bool, seed: int = 0):
        import os

        self.root, self.img_size, self.train = root, img_size, train
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.samples = [
            (os.path.join(root, c, f), i)
            for i, c in enumerate(self.classes)
            for f in sorted(os.listdir(os.path.join(root, c)))
            if f.lower().endswith(IMAGE_EXTENSIONS)
        ]
        if not self.samples:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders under {root!r}")
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def _random_crop_box(self, w: int, h: int, g: torch.Generator) -> tuple:
        area = w * h
        for _ in range(10):
            target = area * (0.08 + 0.92 * torch.rand(1, generator=g).item())
            log_ratio = (torch.rand(1, generator=g).item() * 2 - 1) * math.log(4 / 3)
            aspect = math.exp(log_ratio)
            cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                x0 = int(torch.randint(0, w - cw + 1, (1,), generator=g))
                y0 = int(torch.randint(0, h - ch + 1, (1,), generator=g))
                return (x0, y0, x0 + cw, y0 + ch)
        s = min(w, h)
        return ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)

    def __getitem__(self, index: int):
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            if self.train:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 100_003 + index)
                im = im.resize((self.img_size, self.img_size), Image.BILINEAR, box=self._random_crop_box(w, h, g))
                if torch.rand(1, generator=g).item() < 0.5:
                    im = im.transpose(Image.FLIP_LEFT_RIGHT)
            else:
                short = int(self.img_size / 0.875)
                scale = short / min(w, h)
                im = im.resize((max(short, round(w * scale)), max(short, round(h * scale))), Image.BILINEAR)
                left, top = (im.width - self.img_size) // 2, (im.height - self.img_size) // 2
                im = im.crop((left, top, left + self.img_size, top + self.img_size))
            x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(self.img_size, self.img_size, 3)
        x = x.permute(2, 0, 1).float().div_(255)
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (x - mean) / std, label
