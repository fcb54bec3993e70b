"""Model plugins: where the network, its config and its tokenizer come from."""
