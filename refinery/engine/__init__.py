"""Run a stage's row-parallel work in this process (``local``) or on a Ray cluster (``ray``), with equal outputs."""
