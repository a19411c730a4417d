"""Dataset-level checks: expectations (Great Expectations) and diversity."""
