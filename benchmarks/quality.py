"""Moved into the package: `scoresde bench --only quality`. This keeps the old command working."""
from scoresde.bench.quality import main

raise SystemExit(main())
