"""Built-in downstream task plugins."""
