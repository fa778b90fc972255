"""CLI command groups, one module per package they drive."""
