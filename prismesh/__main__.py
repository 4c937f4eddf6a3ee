"""``python -m prismesh``: the same as the ``prismesh`` console script."""

import sys

from prismesh.cli import main

sys.exit(main())
