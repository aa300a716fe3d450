"""modelward: over-the-air updates of ML models, verified with TUF and anchored in a TPM."""

__version__ = "0.1.0"
__all__ = ["__version__"]
