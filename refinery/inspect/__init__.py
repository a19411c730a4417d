"""Look at a project: row diffs, lineage, the review page, doctor and check."""
