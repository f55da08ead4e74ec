"""Native-resolution (NaFlex) data: variable-size images cut into patches, batched to a token budget, in timm's
NaFlex collator form (padded) or packed back to back (``cu_seqlens``).

The method is NaViT's (Dehghani et al. 2023, "Patch n' Pack") with FlexiViT-style sequence-length buckets
(Beyer et al. 2023): each image keeps its aspect ratio and is resized to the largest size whose patch grid fits
the batch's maximum sequence length; a batch's size is the token budget divided by that length.

* :func:`grid_for_seq_len`, :func:`patchify`: one image -> ``patches (n, P*P*C)`` in the (ph, pw, C) channels-last
  flat order, ``coord (n, 2)`` (y, x) int64.
* :func:`collate_padded` (timm's dict ``patches`` / ``patch_coord`` / ``patch_valid`` / ``seq_len``) and
  :func:`collate_packed` (``patches (T, K)``, ``coord (T, 2)``, ``cu_seqlens (S + 1,)`` int32).
* :class:`TokenBudgetBatchSampler`: per batch a maximum sequence length drawn from a list (default
  :data:`DEFAULT_SEQ_LENS`) and ``batch size = token budget // seq_len``; deterministic with a seed.
* Sources: :func:`digits_variable_resolution` (scikit-learn's digits at random sizes and aspect ratios) and
  :class:`NativeImageFolder` (class-per-folder images at their native size); :class:`NaFlexDataset` patchifies a
  source at a requested maximum length.
* :func:`drop_tokens`: MAE-style random token dropping on a padded batch (keep a fraction of each image's valid
  patches).

No timm import: this module only needs torch (Pillow for image folders, scikit-learn for the digits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_SEQ_LENS = (128, 256, 576, 784, 1024)
DEFAULT_TOKEN_BUDGET = 16384  # padded tokens per batch (e.g. 16 images at 1024)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def grid_for_seq_len(height: int, width: int, patch_size: int, max_seq_len: int) -> tuple[int, int]:
    """The patch grid (rows, cols) of an (height, width) image resized, aspect ratio kept, to the largest scale
    whose grid fits ``max_seq_len`` patches (each side rounded up to whole patches, at least one patch).

    The grid at scale r is (ceil(r h / P), ceil(r w / P)); it only changes at r = k P / h or r = k P / w, and the
    largest feasible r is one of these break points, so they are enumerated exactly (integer arithmetic, no
    search tolerance). The result matches a binary search for the largest feasible ratio (timm's NaFlex resize).

    Args:
        height, width: image size in pixels (>= 1).
        patch_size: P >= 1.
        max_seq_len: the most patches allowed (>= 1).

    Returns:
        (gh, gw) with gh * gw <= max_seq_len; the resized image is (gh * P, gw * P) pixels.

    Raises:
        ValueError: a size, patch_size or max_seq_len below 1.
    """
    for name, v in (("height", height), ("width", width), ("patch_size", patch_size), ("max_seq_len", max_seq_len)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1; got {v!r}")
    best, best_r = (1, 1), (0, 1)  # r as a fraction (num, den): compare a/b > c/d as a*d > c*b
    for k in range(1, max_seq_len + 1):
        # r = k P / height: rows exactly k; r = k P / width: cols exactly k
        for gh, gw, num, den in ((k, max(1, _ceil_div(width * k, height)), k, height),
                                 (max(1, _ceil_div(height * k, width)), k, k, width)):
            if gh * gw <= max_seq_len and num * best_r[1] > best_r[0] * den:
                best, best_r = (gh, gw), (num, den)
    return best


def patchify(image: torch.Tensor, patch_size: int, max_seq_len: int, resize: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize one image (aspect ratio kept) to fit ``max_seq_len`` patches and cut it into patches.

    Args:
        image: (C, H, W) floating.
        patch_size: P.
        max_seq_len: the most patches (see :func:`grid_for_seq_len`).
        resize: False: the image must already be (gh P, gw P) with gh * gw <= max_seq_len; no resampling.

    Returns:
        (patches (n, K) image's dtype, K = P * P * C, each row the patch's pixels in (ph, pw, C) order -- row-major
        over the patch's pixels, channels innermost, the order timm's NaFlex collator uses; coord (n, 2) int64,
        (y, x) grid position), n = gh * gw patches in row-major grid order.

    Raises:
        ValueError: image not 3-D floating; with ``resize=False``, a size that is not a multiple of P or has too
            many patches.

    Resizing is bilinear with antialiasing (``F.interpolate``), to (gh P, gw P) from :func:`grid_for_seq_len`.
    """
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or not image.is_floating_point():
        raise ValueError(f"image must be a floating (C, H, W) tensor; got "
                         f"{getattr(image, 'dtype', type(image).__name__)} shape {tuple(getattr(image, 'shape', ()))}")
    C, H, W = image.shape
    P = patch_size
    if resize:
        gh, gw = grid_for_seq_len(H, W, P, max_seq_len)
        if (gh * P, gw * P) != (H, W):
            image = F.interpolate(image[None], size=(gh * P, gw * P), mode="bilinear", align_corners=False,
                                  antialias=True)[0]
    else:
        if H % P or W % P or (H // P) * (W // P) > max_seq_len:
            raise ValueError(f"with resize=False the image must be multiples of patch_size={P} with at most "
                             f"max_seq_len={max_seq_len} patches; got (H, W) = {(H, W)}")
        gh, gw = H // P, W // P
    patches = image.reshape(C, gh, P, gw, P).permute(1, 3, 2, 4, 0).reshape(gh * gw, P * P * C)
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    return patches, torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=1)


def _check_samples(samples) -> None:
    if not samples:
        raise ValueError("samples must hold at least one (patches, coord) pair; got none")
    K = samples[0][0].shape[-1]
    for i, (p, c) in enumerate(samples):
        if p.dim() != 2 or p.shape[-1] != K or p.shape[0] < 1:
            raise ValueError(f"samples[{i}] patches must be (n >= 1, K={K}); got {tuple(p.shape)}")
        if tuple(c.shape) != (p.shape[0], 2):
            raise ValueError(f"samples[{i}] coord must be ({p.shape[0]}, 2); got {tuple(c.shape)}")


def collate_padded(samples: list[tuple[torch.Tensor, torch.Tensor]], pad_to: int | None = None) -> dict:
    """Batch patchified images in timm's NaFlex collator form, zero-padded.

    Args:
        samples: [(patches (n_i, K), coord (n_i, 2) int64)] from :func:`patchify`.
        pad_to: N_max; None: the batch's longest n_i (timm pads to the bucket's max sequence length: pass it).

    Returns:
        {'patches': (B, N_max, K) samples' dtype, padding rows 0; 'patch_coord': (B, N_max, 2) int64, padding
        (0, 0); 'patch_valid': (B, N_max) bool, True for the first n_i rows; 'seq_len': N_max (int)}.

    Raises:
        ValueError: no samples; inconsistent K; coord not (n_i, 2); pad_to below the longest sample.
    """
    _check_samples(samples)
    lens = [p.shape[0] for p, _ in samples]
    n_max = max(lens) if pad_to is None else pad_to
    if n_max < max(lens):
        raise ValueError(f"pad_to={pad_to} is shorter than the longest sample ({max(lens)} patches)")
    B, K = len(samples), samples[0][0].shape[-1]
    patches = samples[0][0].new_zeros(B, n_max, K)
    coord = torch.zeros(B, n_max, 2, dtype=torch.int64)
    valid = torch.zeros(B, n_max, dtype=torch.bool)
    for i, (p, c) in enumerate(samples):
        patches[i, :len(p)] = p
        coord[i, :len(p)] = c
        valid[i, :len(p)] = True
    return {"patches": patches, "patch_coord": coord, "patch_valid": valid, "seq_len": n_max}


def collate_packed(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor]:
    """Pack patchified images back to back (NaViT packing, no padding).

    Args:
        samples: [(patches (n_i, K), coord (n_i, 2) int64)].

    Returns:
        (patches (T, K), coord (T, 2) int64, cu_seqlens (S + 1,) int32: image s is rows
        cu_seqlens[s]:cu_seqlens[s + 1]), T = sum n_i, S = len(samples).

    Raises:
        ValueError: as :func:`collate_padded`.
    """
    _check_samples(samples)
    lens = torch.tensor([0] + [p.shape[0] for p, _ in samples], dtype=torch.int64)
    cu = lens.cumsum(0).to(torch.int32)
    return torch.cat([p for p, _ in samples]), torch.cat([c for _, c in samples]), cu


def padded_to_packed(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The packed form (:func:`collate_packed`) of a padded batch: its valid rows, in order.

    Args:
        batch: a :func:`collate_padded` dict; each row's valid patches must come first (as the collator lays
            them out).

    Returns:
        (patches (T, K), coord (T, 2), cu_seqlens (S + 1,) int32).

    Raises:
        ValueError: a row with no valid patch, or a valid patch after a padding one.
    """
    valid = batch["patch_valid"]
    lens = valid.sum(1)
    if (lens < 1).any():
        raise ValueError("every image needs at least one valid patch; patch_valid has an all-False row")
    prefix = torch.arange(valid.shape[1])[None] < lens[:, None]
    if not torch.equal(prefix, valid):
        raise ValueError("patch_valid must be True on a prefix of each row (valid patches first)")
    cu = torch.cat([lens.new_zeros(1), lens.cumsum(0)]).to(torch.int32)
    return batch["patches"][valid], batch["patch_coord"][valid], cu


def drop_tokens(batch: dict, mask_ratio: float, generator: torch.Generator | None = None) -> dict:
    """MAE-style token dropping (He et al. 2022) on a padded NaFlex batch: keep a random
    ``max(1, round((1 - mask_ratio) * n_i))`` of each image's n_i valid patches, in their original order, and
    drop the rest before the model (which then embeds only the kept ones).

    Args:
        batch: a :func:`collate_padded` dict (valid patches first in each row).
        mask_ratio: the dropped fraction r, 0 <= r < 1.
        generator: the random source (deterministic with a seeded generator).

    Returns:
        a new dict of the same form, padded to the longest kept count: 'patches', 'patch_coord', 'patch_valid',
        'seq_len', and 'ids_keep' (B, N_keep) int64: each kept patch's index in the input row (padding: 0).

    Raises:
        ValueError: mask_ratio outside [0, 1).
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1); got {mask_ratio}")
    valid = batch["patch_valid"]
    B, N = valid.shape
    lens = valid.sum(1).tolist()
    keep = [max(1, round((1.0 - mask_ratio) * n)) for n in lens]
    n_keep = max(keep)
    ids = torch.zeros(B, n_keep, dtype=torch.int64)
    new_valid = torch.zeros(B, n_keep, dtype=torch.bool)
    for i, (n, k) in enumerate(zip(lens, keep)):
        ids[i, :k] = torch.randperm(n, generator=generator)[:k].sort().values
        new_valid[i, :k] = True
    K = batch["patches"].shape[-1]
    patches = batch["patches"].gather(1, ids[..., None].expand(-1, -1, K)) * new_valid[..., None]
    coord = batch["patch_coord"].gather(1, ids[..., None].expand(-1, -1, 2)) * new_valid[..., None]
    return {"patches": patches, "patch_coord": coord, "patch_valid": new_valid, "seq_len": n_keep, "ids_keep": ids}


def naflex_batch_size(token_budget: int, seq_len: int) -> int:
    """timm's NaFlex rule: ``max(1, token_budget // seq_len)`` images per batch.

    Raises:
        ValueError: token_budget or seq_len below 1.
    """
    if token_budget < 1 or seq_len < 1:
        raise ValueError(f"token_budget and seq_len must be >= 1; got {token_budget}, {seq_len}")
    return max(1, token_budget // seq_len)


class TokenBudgetBatchSampler:
    """Batches of dataset indices for variable-length training: each batch draws a maximum sequence length from
    ``seq_lens`` (uniformly) and takes ``token_budget // seq_len`` images (:func:`naflex_batch_size`; the last
    batch may be smaller). Iterating yields ``(seq_len, [indices])``; the same ``(seed, epoch)`` gives the same
    batches.

    Each epoch visits every index once (a seeded permutation), as timm's NaFlex loader does; with ``num_replicas``
    > 1 the batches are dealt round-robin and rank ``rank`` keeps its share (ranks get a different number of
    images when the schedule does not divide evenly).

    Raises:
        ValueError: num_samples < 1, an empty or non-positive ``seq_lens``, token_budget < 1, rank outside
            [0, num_replicas).
    """

    def __init__(self, num_samples: int, seq_lens=DEFAULT_SEQ_LENS, token_budget: int = DEFAULT_TOKEN_BUDGET,
                 seed: int = 0, num_replicas: int = 1, rank: int = 0):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1; got {num_samples}")
        seq_lens = sorted(set(int(s) for s in seq_lens))
        if not seq_lens or seq_lens[0] < 1:
            raise ValueError(f"seq_lens must be positive ints; got {seq_lens}")
        if token_budget < 1:
            raise ValueError(f"token_budget must be >= 1; got {token_budget}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}); got {rank}")
        self.num_samples, self.seq_lens, self.token_budget = num_samples, tuple(seq_lens), token_budget
        self.seed, self.num_replicas, self.rank, self.epoch = seed, num_replicas, rank, 0

    def set_epoch(self, epoch: int) -> None:
        """Use the batches of ``epoch`` next."""
        self.epoch = epoch

    def batches(self) -> list[tuple[int, list[int]]]:
        """This rank's (seq_len, indices) batches of the current epoch."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.num_samples, generator=g).tolist()
        out, i = [], 0
        while i < len(perm):
            seq_len = self.seq_lens[int(torch.randint(len(self.seq_lens), (1,), generator=g))]
            bs = naflex_batch_size(self.token_budget, seq_len)
            out.append((seq_len, perm[i:i + bs]))
            i += bs
        return out[self.rank::self.num_replicas]

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


class NaFlexDataset(torch.utils.data.Dataset):
    """Patchifies a variable-size image source on demand: ``ds[(index, max_seq_len)]`` ->
    ``((patches (n, K), coord (n, 2)), label)``.

    Args:
        source: indexable; ``source[i]`` -> (image (C, H, W) float, label int).
        patch_size: P.
    """

    def __init__(self, source, patch_size: int):
        self.source, self.patch_size = source, patch_size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key):
        index, max_seq_len = key
        image, label = self.source[index]
        return patchify(image, self.patch_size, max_seq_len), label

    def batch(self, seq_len: int, indices: list[int]) -> tuple[dict, torch.Tensor]:
        """One padded batch (:func:`collate_padded`, padded to ``seq_len`` as timm does) and its labels (B,) int64."""
        items = [self[(i, seq_len)] for i in indices]
        return (collate_padded([s for s, _ in items], pad_to=seq_len),
                torch.tensor([y for _, y in items], dtype=torch.int64))


class VariableSizeImages(torch.utils.data.Dataset):
    """A list of variable-size images with labels: ``ds[i]`` -> (images[i] (C, H_i, W_i) fp32, labels[i])."""

    def __init__(self, images: list[torch.Tensor], labels: list[int]):
        if len(images) != len(labels):
            raise ValueError(f"images and labels must have the same length; got {len(images)}, {len(labels)}")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def digits_variable_resolution(in_chans: int = 1, min_size: int = 16, max_size: int = 64,
                               test_fraction: float = 0.2, seed: int = 0
                               ) -> tuple[VariableSizeImages, VariableSizeImages]:
    """scikit-learn's digits (8x8, standardised as :func:`fastvit_kernels.data.load_digits_split`) upsampled
    (bilinear) to a random height and an independent random width in ``[min_size, max_size]`` pixels each, so
    sizes and aspect ratios vary; deterministic with ``seed``.

    Returns:
        (train, held-out) :class:`VariableSizeImages` of (in_chans, H_i, W_i) fp32 images, labels 0..9.

    Raises:
        ValueError: min_size < 1 or max_size < min_size.
        ImportError: scikit-learn is missing.
    """
    from .data import load_digits_split

    if min_size < 1 or max_size < min_size:
        raise ValueError(f"need 1 <= min_size <= max_size; got {min_size}, {max_size}")
    xtr, ytr, xte, yte = load_digits_split(8, in_chans, test_fraction, seed)
    g = torch.Generator().manual_seed(seed)

    def resize_all(x, y):
        sizes = torch.randint(min_size, max_size + 1, (len(x), 2), generator=g).tolist()
        imgs = [F.interpolate(xi[None], size=(h, w), mode="bilinear", align_corners=False)[0]
                for xi, (h, w) in zip(x, sizes)]
        return VariableSizeImages(imgs, y.tolist())

    return resize_all(xtr, ytr), resize_all(xte, yte)


class NativeImageFolder(torch.utils.data.Dataset):
    """Class-per-folder images (the layout of :class:`fastvit_kernels.data.ImageFolder`, same class order) at
    their native size and aspect ratio: ``ds[i]`` -> ((3, H_i, W_i) fp32 normalised with the ImageNet mean / std,
    label). Training adds a seeded horizontal flip (per seed, epoch, index); no crop, so aspect ratios survive.

    Raises:
        FileNotFoundError: ``root`` has no class folder with images.
    """

    def __init__(self, root: str, train: bool, seed: int = 0):
        from .data import ImageFolder

        # ImageFolder's listing (classes, samples); the image size argument is unused here
        listing = ImageFolder(root, img_size=1, train=train, seed=seed)
        self.classes, self.samples = listing.classes, listing.samples
        self.train, self.seed, self.epoch = train, seed, 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        from .data import IMAGENET_MEAN, IMAGENET_STD

        path, label = self.samples[index]
        with Image.open(path) as im:
            im = im.convert("RGB")
            if self.train:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 100_003 + index)
                if torch.rand(1, generator=g).item() < 0.5:
                    im = im.transpose(Image.FLIP_LEFT_RIGHT)
            w, h = im.size
            x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(h, w, 3)
        x = x.permute(2, 0, 1).float().div_(255)
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (x - mean) / std, label


def real_tokens(batch: dict) -> int:
    """The number of valid (non-padding) patches of a padded batch."""
    return int(batch["patch_valid"].sum())


__all__ = ["DEFAULT_SEQ_LENS", "DEFAULT_TOKEN_BUDGET", "NaFlexDataset", "NativeImageFolder", "TokenBudgetBatchSampler",
           "VariableSizeImages", "collate_packed", "collate_padded", "digits_variable_resolution", "drop_tokens",
           "grid_for_seq_len", "naflex_batch_size", "padded_to_packed", "patchify", "real_tokens"]
