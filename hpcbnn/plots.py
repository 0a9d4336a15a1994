"""`python -m hpcbnn.plots RUN_DIR`: the command lives in `hpcbnn.run.plots`."""

import sys

from hpcbnn.run.plots import main

if __name__ == "__main__":
    sys.exit(main())
