"""edgeloop export."""
