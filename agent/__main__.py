"""`python -m agent ...` is `edge-agent ...` (how the Greengrass recipe starts it)."""

from agent.cli import main

raise SystemExit(main())
