"""The README's Python example runs as written against a real server."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg

from agentlog import AgentlogClient, AppendEvent, TextDelta
from agentlog.server import JsonlSessionRepository
from tests.contract import delta
from tests.pg import ADMIN_URL, psql_target, url_of
from tests.servers import running_server, served
from tests.test_command import free_port
from tests.test_server import wait_for_port

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_opens_with_the_two_commands() -> None:
    head = README.read_text().splitlines()[:6]
    assert any(line.startswith("make serve") for line in head)
    assert any(line.startswith("make test") for line in head)


def test_the_python_examples_run_each_on_its_own(tmp_path: Path) -> None:
    examples = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(examples) == 5
    output = io.StringIO()
    branched = tmp_path / "branched"
    with (
        running_server(JsonlSessionRepository(tmp_path)) as target,
        running_server(JsonlSessionRepository(branched, layout="branches")) as branch_target,
    ):
        for example in examples:
            # The branches example needs a server in the branch layout (as it says).
            where = branch_target if "fork_session" in example else target
            code = example.replace("127.0.0.1:50051", where)
            namespace: dict[str, object] = {}  # each as if pasted alone
            with contextlib.redirect_stdout(output):
                exec(compile(code, "README.md", "exec"), namespace)
    lines = output.getvalue().splitlines()
    assert [line.split()[1] for line in lines[:2]] == ["run_started", "tool_call_requested"]
    assert (tmp_path / "demo.jsonl").read_text().count("\n") == 2
    assert (tmp_path / "chat.jsonl").read_text().count("\n") == 4
    assert "streamed 4 deltas; last sequence 4" in lines
    assert (tmp_path / "stream.jsonl").read_text().count("\n") == 4
    assert lines[-3] == (
        "ForkedFrom(session_id='plan', branch_id='main', sequence=1) ['step one', 'a better turn']"
    )
    assert lines[-2:] == ["2 [('user-7-chat-1', 'Greeting')]", "[1]"]
    assert not (tmp_path / "user-7-chat-1.jsonl").exists()
    assert (branched / "plan__retry.jsonl").read_text().count("\n") == 2


def test_the_postgresql_commands_run_as_written(tmp_path: Path) -> None:
    section = README.read_text().split("## Many replicas on PostgreSQL", 1)[1]
    commands = re.findall(r"```sh\n(.*?)```", section, re.S)[0].strip().splitlines()
    assert len(commands) == 2
    name = f"agentlog_readme_{uuid.uuid4().hex[:12]}"
    create, serve = commands
    # As written on a machine whose server is 127.0.0.1:5432; elsewhere, the test server's.
    create = create.replace("DATABASE agentlog", f"DATABASE {name}")
    create = create.replace("-h 127.0.0.1", " ".join(psql_target()))
    serve = serve.replace(
        "postgresql://postgres@127.0.0.1:5432/agentlog", shlex.quote(url_of(name))
    )
    port = free_port()
    subprocess.run(create, shell=True, check=True, capture_output=True, timeout=60)
    env = {
        **os.environ,
        "AGENTLOG_ADDR": f"127.0.0.1:{port}",
        "AGENTLOG_HTTP_ADDR": f"127.0.0.1:{free_port()}",
    }
    env.pop("MAKEFLAGS", None)
    process = subprocess.Popen(
        serve,
        shell=True,
        cwd=README.parent,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, line = wait_for_port(process)
        assert f"127.0.0.1:{port}" in line
        assert "PostgreSQL" in line
        with AgentlogClient(f"127.0.0.1:{port}") as client:
            client.append(AppendEvent(session_id="pg", event=delta("pg", "x")))
            assert len(client.load_session("pg")) == 1
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.communicate(timeout=30)
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_the_session_commands_run_as_written(tmp_path: Path) -> None:
    section = README.read_text().split("## Deleting, retention and labels", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line.split("  #", 1)[0]) for line in block.splitlines()]
    assert [c[1] for c in commands] == ["sessions", "show", "show", "label", "delete"]
    agentlog = str(Path(sys.executable).with_name("agentlog"))
    with running_server(JsonlSessionRepository(tmp_path)) as target:
        with AgentlogClient(target) as client:
            event = TextDelta(run_id="r", session_id="user-7-chat-1", iteration=1, delta="Hi")
            client.append(
                AppendEvent(session_id="user-7-chat-1", event=event, labels={"app": "chat"})
            )
        outputs = []
        for command in commands:
            done = subprocess.run(
                [agentlog, *command[1:], "--addr", target],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, (command, done.stderr)
            outputs.append(done.stdout)
    assert "user-7-chat-1" in outputs[0]
    assert "app=chat" in outputs[0]
    assert "text: Hi" in outputs[1]
    assert "title=A greeting" in outputs[3]
    assert "deleted branch main of session user-7-chat-1" in outputs[4]


def test_the_curl_commands_run_as_written(tmp_path: Path) -> None:
    section = README.read_text().split("## The web console, and the contract over HTTP", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = block.strip().splitlines()
    assert len(commands) == 3
    with served(JsonlSessionRepository(tmp_path), http_address="127.0.0.1:0") as (built, _):
        assert built.http is not None
        answers = [
            json.loads(
                subprocess.run(
                    command.replace("127.0.0.1:8080", f"127.0.0.1:{built.http.port}"),
                    shell=True,
                    check=True,
                    capture_output=True,
                    text=True,
                    timeout=60,
                ).stdout
            )
            for command in commands
        ]
    assert answers[0]["record"]["sequence"] == "1"
    assert answers[1]["record"]["event"] == {
        "textDelta": {"runId": "r", "sessionId": "from-curl", "delta": "hello"}
    }
    assert answers[2]["code"] == "invalid_argument"
    assert answers[2]["message"].startswith("session_id '../x' cannot name a session")
    assert (tmp_path / "from-curl.jsonl").read_text().count("\n") == 1
