"""YAML options this package contributes to automodel's config groups (conf/<group>/<option>.yaml)."""
