"""CAN ingest: DBC loading, pack signal map, frame decode, checks, bus sources."""
