"""PEFT plugins: which parameters train, and how adapters are exported."""
