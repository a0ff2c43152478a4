"""Moved into the package: `scoresde bench --only train`. This keeps the old command working."""
from scoresde.bench.training import main

raise SystemExit(main())
