"""Fixtures for the benchmarks (the image itself is built in bigimage.py)."""
import os

# OpenBLAS worker threads spin after numpy's first BLAS call and took a core
# of these 2-core machines from the loops being measured.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402

from bigimage import build_big_image  # noqa: E402


@pytest.fixture(scope="session")
def big_image():
    return build_big_image()
