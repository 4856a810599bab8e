"""`python -m prefixtune ...` (also what torchrun / accelerate launch run)."""

import sys

from .cli import main

sys.exit(main())
