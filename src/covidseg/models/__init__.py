"""Neural network models (library layer)."""
