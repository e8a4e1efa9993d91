"""`python -m lmforge` (and so `torchrun -m lmforge ...`)."""
import sys

from lmforge.cli import main

sys.exit(main())
