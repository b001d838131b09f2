"""BatchNorm in training mode needs more than one value per channel: one clear error.

A BatchNorm layer in training mode normalises with the statistics of the batch, so each channel
needs at least two values (batch x height x width). A batch of one sample reaching a 1x1
feature map (the end of a VGG on 32x32 images, a BatchNorm1d after the classifier) makes torch
raise ``ValueError: Expected more than 1 value per channel when training, got input size
...`` from deep inside the forward. :func:`batch_statistics_errors` turns that into one
:class:`BatchStatisticsError` naming the batch size and the feature map, with what to do.

At the bottom of the package (it imports only :mod:`cnnpress.errors`), so that a
training step, BatchNorm recalibration or a user's own loop can wrap its forward in it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from cnnpress.errors import CnnpressError

__all__ = ["BatchStatisticsError", "batch_statistics_errors"]

_TORCH_MESSAGE = "Expected more than 1 value per channel when training"
_SIZE = re.compile(r"input size torch\.Size\(\[([\d, ]*)\]\)")


class BatchStatisticsError(CnnpressError):
    """A BatchNorm in training mode got one value per channel (no batch statistics)."""


def _describe(shape: tuple[int, ...]) -> str:
    if len(shape) < 2:
        return f"an input of size {shape}"
    batch, channels, *spatial = shape
    where = f"a {'x'.join(map(str, spatial))} feature map" if spatial else "features"
    return f"a batch of {batch} of {where} with {channels} channels (input size {shape})"


@contextmanager
def batch_statistics_errors() -> Iterator[None]:
    """Around a forward that may reach a BatchNorm in training mode with one value per
    channel: that case raises a :class:`BatchStatisticsError`, anything else is unchanged.

    Example::

        with batch_statistics_errors():
            out = model(x)

    Raises:
        BatchStatisticsError: One line: the batch size, the feature map the BatchNorm got,
            and to use a batch of at least 2 or eval mode.
    """
    try:
        yield
    except ValueError as err:
        if _TORCH_MESSAGE not in str(err):
            raise
        match = _SIZE.search(str(err))
        shape = tuple(int(v) for v in match.group(1).split(",") if v.strip()) if match else ()
        got = _describe(shape) if shape else "one value per channel"
        raise BatchStatisticsError(
            f"a BatchNorm layer in training mode got {got}: batch statistics need at "
            "least 2 values per channel; use a batch of at least 2 (--batch-size, per process "
            "when distributed) or eval mode (model.eval())"
        ) from None
