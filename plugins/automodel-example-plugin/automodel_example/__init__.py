"""automodel-example-plugin: the Lion optimizer as an automodel `optim` plugin."""
