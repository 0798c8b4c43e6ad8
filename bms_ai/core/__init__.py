"""Small shared helpers every room uses: registry by name, shipped files, safe YAML."""
