"""`python -m gateway.compile [build|clean|state]`: compile the request path with mypyc (gateway.native)."""

import sys

from .native import main

sys.exit(main(sys.argv[1:]))
