"""edgeloop train."""
