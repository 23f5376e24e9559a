"""ml-collections configs: one get_config() per file."""
