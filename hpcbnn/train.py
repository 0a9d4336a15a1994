"""`python -m hpcbnn.train`: the command lives in `hpcbnn.run.train`."""

import sys

from hpcbnn.run.train import main

if __name__ == "__main__":
    sys.exit(main())
