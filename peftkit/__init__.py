"""peftkit: parameter-efficient fine-tuning from YAML recipes."""

__version__ = "0.1.0"
