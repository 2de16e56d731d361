"""`python -m i2l.cli ...`: the `i2l` command."""

import sys

from i2l.cli import main

sys.exit(main())
