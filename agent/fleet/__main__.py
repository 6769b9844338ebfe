"""`python -m agent.fleet ...` is `edge-fleet ...`."""

from agent.fleet.cli import main

raise SystemExit(main())
