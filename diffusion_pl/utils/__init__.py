"""Small helpers shared by every layer (no Lightning, no networks)."""
