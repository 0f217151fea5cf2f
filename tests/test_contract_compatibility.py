"""`buf breaking` guards the released contract: a change that would break generated
clients fails, an additive one passes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUF = ROOT / "node_modules" / ".bin" / "buf"
BASELINE = ROOT / "protos" / "released" / "agentlog-v1.binpb"
PROTO = ROOT / "protos" / "agentlog" / "v1" / "session.proto"


def breaking(tmp_path: Path, change: tuple[str, str]) -> subprocess.CompletedProcess[str]:
    module = tmp_path / "protos"
    target = module / "agentlog" / "v1" / "session.proto"
    target.parent.mkdir(parents=True)
    text = PROTO.read_text()
    assert change[0] in text
    target.write_text(text.replace(change[0], change[1], 1))
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    return subprocess.run(
        [str(BUF), "breaking", str(tmp_path), "--against", str(BASELINE)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,  # the exit status is what the tests look at
    )


def test_the_contract_as_it_stands_is_compatible_with_the_release(tmp_path: Path) -> None:
    result = breaking(tmp_path, ("", ""))
    assert result.returncode == 0, result.stdout + result.stderr


def test_renumbering_a_field_is_refused(tmp_path: Path) -> None:
    result = breaking(tmp_path, ("uint64 sequence = 6;", "uint64 sequence = 8;"))
    assert result.returncode != 0
    assert "sequence" in result.stdout + result.stderr


def test_adding_a_field_is_allowed(tmp_path: Path) -> None:
    result = breaking(
        tmp_path,
        ("  string branch_id = 7;\n}", "  string branch_id = 7;\n  // New.\n  string note = 8;\n}"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
