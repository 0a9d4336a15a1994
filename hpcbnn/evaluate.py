"""`python -m hpcbnn.evaluate`: the command lives in `hpcbnn.run.evaluate`."""

import sys

from hpcbnn.run.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
