"""Built-in data for the main job, nothing downloaded: scikit-learn's bundled handwritten digits (real images,
1797 8x8 grayscale, 10 classes; UCI Optical Recognition of Handwritten Digits) and a synthetic set of
class templates plus noise (for throughput runs at any image size)."""

from __future__ import annotations

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
