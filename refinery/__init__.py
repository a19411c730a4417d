"""Turn human seed data into a curated synthetic post-training dataset with provenance."""

__version__ = "0.1.0"
