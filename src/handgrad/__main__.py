"""`python -m handgrad`: the `handgrad` command without its installed entry point."""
import sys

from .cli import main

sys.exit(main())
