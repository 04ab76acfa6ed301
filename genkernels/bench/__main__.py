"""`python -m genkernels.bench`: the same as `genkernels bench`."""

import sys

from . import main

sys.exit(main())
