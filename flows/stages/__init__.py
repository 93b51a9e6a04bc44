"""The release stages, one module each, in the order a model travels (flows/release.py runs them)."""
