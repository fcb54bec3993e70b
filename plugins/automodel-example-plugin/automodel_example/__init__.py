"""automodel-example-plugin: one example automodel plugin per group (see README.md and docs/plugins.md)."""
