"""`python -m agentlog.server` runs the `agentlog` command."""

import sys

from agentlog.server.cli import main

sys.exit(main())
