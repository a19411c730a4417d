"""Read seed data in its source formats."""
