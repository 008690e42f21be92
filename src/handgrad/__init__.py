"""handgrad: neural language models trained with hand-written backward passes."""
__version__ = "0.1.0"
