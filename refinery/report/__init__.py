"""The experiment's statistics and the report."""
