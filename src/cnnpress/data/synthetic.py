"""A small, learnable, deterministic image data set for tests and demos.

Every class has a fixed template image (smooth blobs plus fine texture) drawn from a
generator seeded by ``seed``; each sample is its class template plus Gaussian noise, clipped
to uint8. Train and test share the templates but use different noise and label draws.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cnnpress.data.errors import DataError
from cnnpress.data.spec import Dataset, DatasetSpec

__all__ = ["SYNTHETIC_DEFAULTS", "make_synthetic", "synthetic_spec"]

#: Default options of :func:`make_synthetic`; ``num_samples`` depends on the split.
SYNTHETIC_DEFAULTS: dict[str, int] = {
    "in_channels": 1,
    "image_size": 16,
    "num_classes": 4,
    "seed": 0,
}
_DEFAULT_SAMPLES = {"train": 512, "test": 256}
_NOISE_STD = 40.0


def _size(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return (image_size, image_size)
    if len(image_size) != 2:
        raise DataError(f"synthetic: image_size must be an int or (H, W), got {image_size!r}")
    return (int(image_size[0]), int(image_size[1]))


def synthetic_spec(
    in_channels: int = 1, image_size: int | tuple[int, int] = 16, num_classes: int = 4
) -> DatasetSpec:
    """The spec of a synthetic data set with the given shape options."""
    return DatasetSpec(
        name="synthetic",
        in_channels=int(in_channels),
        image_size=_size(image_size),
        num_classes=int(num_classes),
        mean=(0.5,) * int(in_channels),
        std=(0.25,) * int(in_channels),
        class_names=tuple(f"class{i}" for i in range(int(num_classes))),
        crop_padding=0,
        hflip=False,
    )


def _templates(spec: DatasetSpec, seed: int) -> torch.Tensor:
    """Per-class float templates in pixel units, shape (K, C, H, W)."""
    gen = torch.Generator().manual_seed(int(seed))
    k, c, (h, w) = spec.num_classes, spec.in_channels, spec.image_size
    coarse = torch.rand((k, c, 4, 4), generator=gen)
    smooth = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    fine = torch.rand((k, c, h, w), generator=gen)
    return (0.75 * smooth + 0.25 * fine) * 255.0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_options(num_samples: object, opts: dict[str, object]) -> None:
    """One line for an option of the wrong type or sign (``num_classes: many``)."""
    checks = [("num_samples", num_samples, 0)] if num_samples is not None else []
    checks += [(key, opts[key], 1) for key in ("in_channels", "num_classes")]
    for key, value, least in checks:
        if not _is_int(value) or value < least:
            raise DataError(f"synthetic: {key} must be an integer >= {least}, got {value!r:.60}")
    if not _is_int(opts["seed"]):
        raise DataError(f"synthetic: seed must be an integer, got {opts['seed']!r:.60}")
    size = opts["image_size"]
    pair = isinstance(size, (list, tuple)) and len(size) == 2
    sizes = [size] if _is_int(size) else list(size) if pair else [None]
    if not all(_is_int(v) and v >= 1 for v in sizes):
        raise DataError(
            f"synthetic: image_size must be an integer >= 1 or [H, W], got {size!r:.60}"
        )


def make_synthetic(split: str, num_samples: int | None = None, **options: int) -> Dataset:
    """Generate the synthetic data set's ``split``.

    Args:
        split: ``"train"`` or ``"test"``.
        num_samples: Number of samples (default 512 for train, 256 for test).
        **options: ``in_channels`` (1), ``image_size`` (16, or (H, W)), ``num_classes`` (4),
            ``seed`` (0).

    Returns:
        The split; deterministic in ``(options, split)``.

    Raises:
        DataError: An unknown option or a bad value.
    """
    unknown = sorted(set(options) - set(SYNTHETIC_DEFAULTS))
    if unknown:
        known = ", ".join(["num_samples", *SYNTHETIC_DEFAULTS])
        raise DataError(f"synthetic: unknown option(s) {', '.join(unknown)}; known: {known}")
    opts = {**SYNTHETIC_DEFAULTS, **options}
    _check_options(num_samples, opts)
    n = _DEFAULT_SAMPLES[split] if num_samples is None else int(num_samples)
    spec = synthetic_spec(opts["in_channels"], opts["image_size"], opts["num_classes"])
    templates = _templates(spec, int(opts["seed"]))
    split_code = 1 if split == "train" else 2
    gen = torch.Generator().manual_seed(int(opts["seed"]) * 1_000_003 + split_code)
    labels = torch.arange(n, dtype=torch.int64) % spec.num_classes
    labels = labels[torch.randperm(n, generator=gen)]
    noise = torch.randn((n, *templates.shape[1:]), generator=gen) * _NOISE_STD
    images = (templates[labels] + noise).round().clamp(0, 255).to(torch.uint8)
    return Dataset(images=images, labels=labels, spec=spec, split=split)
