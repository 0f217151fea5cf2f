"""The Python side of the cross-language tests: run from the repository root as
`python clients/typescript/test/bridge.py COMMAND TARGET ...` (a real server)."""

from __future__ import annotations

import sys

sys.path.insert(0, ".")  # tests.samples

from agentlog import AgentlogClient, AppendEvent
from agentlog._codec import event_to_json
from agentlog._json import dumps
from tests.samples import every_event


def main() -> None:
    command, target, *args = sys.argv[1:]
    with AgentlogClient(target, retries=0) as client:
        if command == "events":  # each record's event as JSON text, one a line
            for record in client.load_session(args[0]):
                print(dumps(event_to_json(record.event)))
        elif command == "append-samples":  # every variant, hostile values included
            for event in every_event(args[0]):
                client.append(AppendEvent(session_id=args[0], event=event))
        else:
            raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main()
