"""Hold one module per DVC stage: a pure core over Arrow tables plus a thin click command."""
