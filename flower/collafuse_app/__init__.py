"""Import shims: the Flower components live in the installed package (collafuse.flower)."""
