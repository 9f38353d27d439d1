"""jaxdiff: conditional diffusion in pure, functional JAX."""

from jaxdiff import guidance, mixture, parametrization, sampling, schedules

__version__ = "0.1.0"
__all__ = ["guidance", "mixture", "parametrization", "sampling", "schedules"]
