"""``python -m elkeid_agent`` and the zipapp's entry point."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
