"""Fixtures for the benchmarks (the image itself is built in bigimage.py)."""
import os

# OpenBLAS worker threads spin after numpy's first BLAS call and took a core
# of these 2-core machines from the loops being measured.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402

from bigimage import IMAGES, build_big_image  # noqa: E402

_BUILT = {}


def _image(kind):
    if kind not in _BUILT:
        _BUILT[kind] = build_big_image(kind)
    return _BUILT[kind]


@pytest.fixture(scope="session")
def big_image():
    """The 256 MiB image of issue 2 (page tables a large L3 holds)."""
    return _image("256mib")


@pytest.fixture(scope="session", params=IMAGES)
def image(request):
    """Each benchmark image in turn: "256mib", then "huge" (page tables far
    beyond any last-level cache; bigimage.py)."""
    return _image(request.param)
