"""Configuration: typed models, the YAML loader that names paths and lines, JSON Schema."""
