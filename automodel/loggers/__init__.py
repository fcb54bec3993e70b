"""Logger plugins (the `logger` group): where each logged step goes. metrics.jsonl is always written."""
