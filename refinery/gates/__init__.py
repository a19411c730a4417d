"""Quality gates: small objects that return keep / score / reason for every row of a table."""
