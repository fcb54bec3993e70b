"""Teacher plugins (`teacher=none|hf`): a frozen model whose distribution the student also learns from."""
