"""Binary and k-means/pruned layers keep their derived weight between inference forwards
(eval mode, no gradients) and rebuild it when a parameter changes: the outputs always equal
a fresh computation's, and the weight is built once per change, not once per forward."""

from __future__ import annotations

import pytest
import torch

import cnnpress
from cnnpress.methods.binary import BinaryConv2d
from cnnpress.methods.sparse import SparseLayer


def compressed(method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return cnnpress.compress(cnnpress.models.create("lenet5", 1, 4), method).eval()


def layers(model, kind):
    return [m for m in model.modules() if isinstance(m, kind)]


def counted(layer, name: str) -> list[int]:
    """Count the calls of ``layer.<name>`` (the builder the forward passes to the cache)."""
    calls, build = [0], getattr(layer, name)

    def wrapper():
        calls[0] += 1
        return build()

    setattr(layer, name, wrapper)
    return calls


def fresh(model, x):
    with torch.enable_grad():  # gradients on: nothing is kept
        return model(x).detach()


@pytest.mark.parametrize(
    ("method", "kind", "builder"),
    [("bwn", BinaryConv2d, "binary_weight"), ("kmeans", SparseLayer, "dense_weight")],
)
def test_the_weight_is_built_once_per_change_and_the_outputs_stay_exact(method, kind, builder):
    model, x = compressed(method), torch.randn(2, 1, 28, 28)
    layer = layers(model, kind)[0]
    calls = counted(layer, builder)
    with torch.no_grad():
        first, second = model(x), model(x)
    assert calls[0] == 1 and torch.equal(first, second) and torch.equal(first, fresh(model, x))
    assert calls[0] == 2  # the forward with gradients built it again
    # An optimiser step changes the parameters in place: the next inference rebuilds.
    model.train()
    model(x).square().mean().backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    model.eval()
    with torch.no_grad():
        stepped = model(x)
    assert not torch.equal(stepped, first) and torch.equal(stepped, fresh(model, x))
    # load_state_dict copies in place: rebuilt too.
    other = compressed(method)
    state = model.state_dict()
    moved = {k: v + 0.25 * v.abs().mean() if v.is_floating_point() else v for k, v in state.items()}
    other.load_state_dict(moved)
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        loaded = model(x)
    assert torch.equal(loaded, fresh(model, x)) and not torch.equal(loaded, stepped)


def test_a_write_through_data_is_seen_after_train_and_eval():
    model, x = compressed("bwn"), torch.randn(2, 1, 28, 28)
    layer = layers(model, BinaryConv2d)[0]
    with torch.no_grad():
        before = model(x)
    layer.weight.data.neg_()  # bypasses the version counter
    model.train().eval()
    with torch.no_grad():
        after = model(x)
    assert not torch.equal(after, before) and torch.equal(after, fresh(model, x))
