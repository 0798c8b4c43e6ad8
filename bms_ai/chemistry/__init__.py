"""The chemistry registry: OCV tables, limits and pack defaults per cell chemistry."""
