"""A BatchNorm in training mode with one value per channel is one clear error
(cnnpress.batchnorm), for plain and compressed models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cnnpress
from cnnpress.batchnorm import BatchStatisticsError, batch_statistics_errors


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return cnnpress.models.create("resnet20", 1, 10, width=8)


def test_raw_torch_error_without_the_wrapper():
    """What users saw: a ValueError from inside BatchNorm (the wrapper's trigger)."""
    net = resnet().train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        net(torch.randn(1, 1, 4, 4))  # layer3 works on 1x1 maps


@pytest.mark.parametrize("name", cnnpress.methods.names())
def test_batch_of_one_on_a_1x1_feature_map_is_one_cnnpress_error(name):
    net = cnnpress.compress(resnet(), name).train()
    with pytest.raises(BatchStatisticsError) as info, batch_statistics_errors():
        net(torch.randn(1, 1, 4, 4))
    message = str(info.value)
    assert isinstance(info.value, cnnpress.CnnpressError) and "\n" not in message
    assert "a batch of 1 of a 1x1 feature map" in message, message
    assert "batch of at least 2" in message and "eval mode" in message
    with batch_statistics_errors():  # a batch of 2, or eval mode, runs
        assert net(torch.randn(2, 1, 4, 4)).shape == (2, 10)
        assert net.eval()(torch.randn(1, 1, 4, 4)).shape == (1, 10)


def test_batchnorm1d_and_other_errors():
    bn = nn.BatchNorm1d(5).train()
    message = r"a batch of 1 of features with 5 channels"
    with pytest.raises(BatchStatisticsError, match=message), batch_statistics_errors():
        bn(torch.randn(1, 5))
    with pytest.raises(ValueError, match="something else") as info, batch_statistics_errors():
        raise ValueError("something else")
    assert not isinstance(info.value, BatchStatisticsError)
