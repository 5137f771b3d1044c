"""Fixtures for the benchmarks (the image itself is built in bigimage.py)."""
import pytest

from bigimage import build_big_image


@pytest.fixture(scope="session")
def big_image():
    return build_big_image()
