"""The README's Python example runs as written against a real server."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from agentlog.server import JsonlSessionRepository
from tests.servers import running_server

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_opens_with_the_two_commands() -> None:
    head = README.read_text().splitlines()[:6]
    assert any(line.startswith("make serve") for line in head)
    assert any(line.startswith("make test") for line in head)


def test_the_python_examples_run_each_on_its_own(tmp_path: Path) -> None:
    examples = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(examples) == 2
    output = io.StringIO()
    with running_server(JsonlSessionRepository(tmp_path)) as target:
        for example in examples:
            code = example.replace("127.0.0.1:50051", target)
            namespace: dict[str, object] = {}  # each as if pasted alone
            with contextlib.redirect_stdout(output):
                exec(compile(code, "README.md", "exec"), namespace)
    lines = output.getvalue().splitlines()
    assert [line.split()[1] for line in lines[:2]] == ["run_started", "tool_call_requested"]
    assert (tmp_path / "demo.jsonl").read_text().count("\n") == 2
    assert (tmp_path / "chat.jsonl").read_text().count("\n") == 4
