"""`python -m scoresde ...`: the `scoresde` command (so it also runs under `torchrun -m scoresde`)."""
import sys

from .cli import main

sys.exit(main())
