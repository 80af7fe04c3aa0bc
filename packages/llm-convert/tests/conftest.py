"""Fixtures for the conversion tests."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_hf import tiny_hf_configs


@pytest.fixture(params=list(tiny_hf_configs()))
def family_name(request):
    return request.param
