"""Diagnose rejected rows, plan targeted regeneration, and run the attempt loop."""
