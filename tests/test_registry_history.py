"""The registry's history file: a line cut by a kill is not a record and the next row starts a line of
its own; any other damaged line is refused, never skipped (skipping forgets an attempt: a version name
could be reused, a rejected model retrained, a recorded version taken for an orphan)."""

from __future__ import annotations

import json

import pytest

from pipelines.model_registry import ModelRegistry, RegistryError
from pipelines.registry_cli import main as registry_main


def _registry(tmp_path) -> ModelRegistry:
    registry = ModelRegistry(tmp_path / "registry", "finance")
    registry.append_history({"decision": "promoted", "challenger": {"version": "v0001"}})
    registry.append_history({"decision": "rejected", "challenger": {"version": "v0002"}})
    return registry


def test_a_line_cut_by_a_kill_is_left_out_and_the_next_row_stands_on_its_own_line(tmp_path):
    registry = _registry(tmp_path)
    path = registry.path / "history.jsonl"
    with open(path, "ab") as file:
        file.write(b'{"time": "2026-12-01T03:00:00", "decision": "prom')  # a kill mid-write
    assert [row["decision"] for row in registry.history()] == ["promoted", "rejected"]
    assert registry.verify() == []
    registry.append_history({"decision": "rejected", "challenger": {"version": "v0003"}})
    rows = registry.history()  # the new row was not glued to the cut text (which would have lost it)
    assert [row["decision"] for row in rows] == ["promoted", "rejected", "cut-line", "rejected"]
    assert rows[2]["text"] == '{"time": "2026-12-01T03:00:00", "decision": "prom' and rows[3]["challenger"] == {"version": "v0003"}
    assert all(isinstance(json.loads(line), dict) for line in path.read_text().splitlines()) and path.read_bytes().endswith(b"\n")
    assert registry.next_version() == "v0004"


@pytest.mark.parametrize("where", ["middle", "last complete line"])
def test_a_damaged_line_is_refused_by_readers_and_named_by_list_and_verify(tmp_path, capsys, where):
    registry = _registry(tmp_path)
    path = registry.path / "history.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    if where == "middle":
        lines[0] = "\x00\x00 disk garbage\n"
    else:
        lines.append("oops\n")
    path.write_text("".join(lines))
    number = 1 if where == "middle" else 3
    with pytest.raises(RegistryError, match=rf"history.jsonl: line {number} is not a JSON object .* damaged"):
        registry.history()
    with pytest.raises(RegistryError, match=f"line {number}"):
        registry.next_version()  # a new version's name must not reuse one the damaged line recorded
    assert any(f"line {number} is not a JSON object" in problem for problem in registry.verify())
    assert registry_main(["finance", "list", "--registry", str(tmp_path / "registry")]) == 1
    out, err = capsys.readouterr()
    assert ("rejected" in out) and (where != "middle" or "promoted" not in out), "the rows that parse are shown"
    assert f"line {number} is not a JSON object" in err and "verify" in err
    assert registry_main(["finance", "verify", "--registry", str(tmp_path / "registry")]) == 1
    out, err = capsys.readouterr()
    assert f"line {number}" in out + err
