"""HTTP middlewares: one module per kind, each turning its options into a handler wrapper."""
