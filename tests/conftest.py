import jax
import pytest


@pytest.fixture
def x64():
    """Run the test with 64-bit floats (exact checks compare measures to ~1e-12)."""
    with jax.enable_x64(True):
        yield
