"""edgeloop fleet."""
