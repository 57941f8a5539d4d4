"""Neuron attribution: activation x weight per neuron, summing exactly to the output."""

import pytest
import torch

from massact.analysis.mechanism.attribution import contributions


def test_contributions_sum_to_the_output():
    torch.manual_seed(2)
    act, weight = torch.randn(512), torch.randn(512)
    output = float((act.double() * weight.double()).sum()) + 0.25
    neurons, error, needed = contributions(act, weight, 0.25, output, top=5)
    assert error < 1e-9
    assert len(neurons) == 5
    parts = act.double() * weight.double()
    assert neurons[0].contribution == pytest.approx(parts[parts.abs().argmax()].item())
    assert neurons[0].share == pytest.approx(neurons[0].contribution / output)
    assert 1 <= needed <= 512


def test_one_dominant_neuron_is_counted_alone():
    act = torch.full((100,), 0.01)
    act[42] = 500.0
    weight = torch.ones(100)
    neurons, error, needed = contributions(act, weight, 0.0, 500.99, top=3)
    assert neurons[0].neuron == 42 and needed == 1 and error < 1e-9
