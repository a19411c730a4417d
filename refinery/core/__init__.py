"""Plumbing every block shares: atomic I/O, params, errors, provenance stamps, progress, text kernels."""
