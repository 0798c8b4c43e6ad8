"""CAN: DBC loading, pack signal map, frame decode and encode, log readers, frame sources, bus health."""
