"""Resolve, materialise and describe the models each role uses."""
