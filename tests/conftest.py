"""Shared test fixtures. ``device`` runs a test once on "cpu" and once on "cuda"; the CUDA run is
marked ``gpu`` (select or deselect with -m) and skipped where torch sees no CUDA device."""

import pytest
import torch

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    """Every test draws the same random inputs, whatever ran before it."""
    torch.manual_seed(0)
