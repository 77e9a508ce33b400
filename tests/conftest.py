"""Shared fixtures: a small seeded model with several parameter tensors and a fixed batch.

Kept deliberately plain: a factory for the model (so two optimizers can start from identical
weights), one regression batch, and helpers to train a few steps and read the parameters back.
"""
import pytest
import torch
from torch import nn

IN, HIDDEN, MID, OUT = 5, 8, 4, 3


def make_model(dtype=torch.float64, seed=0):
    """Linear-Tanh-Linear-Tanh plus a bias-free Linear: 5 parameter tensors, two without a bias partner."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(IN, HIDDEN), nn.Tanh(),
        nn.Linear(HIDDEN, MID), nn.Tanh(),
        nn.Linear(MID, OUT, bias=False),
    ).to(dtype)


def make_batch(dtype=torch.float64, n=32, seed=1234):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=gen, dtype=torch.float64)
    y = torch.randn(n, OUT, generator=gen, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def loss_fn(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def train(model, opt, batch, steps=20):
    """``steps`` optimizer steps on the fixed batch; returns the losses seen before each step."""
    return train_on(model, opt, [batch] * steps)


def train_on(model, opt, batches, loss=loss_fn, set_to_none=True):
    """One optimizer step per batch of ``batches`` under ``loss(model, batch)``; returns the losses seen
    before each step. (Also the loop of test modules with their own problem, e.g. test_conformance.)"""
    losses = []
    for batch in batches:
        opt.zero_grad(set_to_none=set_to_none)
        value = loss(model, batch)
        value.backward()
        opt.step()
        losses.append(value.item())
    return losses


def flat(params):
    """The parameters as one float64 vector."""
    return torch.cat([p.detach().reshape(-1).to(torch.float64) for p in params])


def flat_params(model):
    return flat(model.parameters())


def max_diff(model_a, model_b):
    return (flat_params(model_a) - flat_params(model_b)).abs().max().item()


@pytest.fixture
def model_factory():
    return make_model


@pytest.fixture
def batch():
    return make_batch()


@pytest.fixture
def helpers():
    """The training helpers as a namespace, so test modules need not import conftest."""
    class H:
        pass
    for f in (make_model, make_batch, loss_fn, train, train_on, flat, flat_params, max_diff):
        setattr(H, f.__name__, staticmethod(f))
    return H
