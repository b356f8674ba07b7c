"""sparse-prefix."""
