"""The harness of the bad-input tables (``tests/test_bad_inputs_<domain>.py``).

A :class:`BadInput` is one thing a user may get wrong: files it writes, runner options, the exit
status expected and the words the one-paragraph error must contain. :func:`check_refused` runs it
through the real runner (``pipelines.run.main``, in this process) and asserts that:

- the command exits with the expected status (2: bad input or options),
- stderr holds an ``error:`` paragraph naming what was wrong (every ``expect`` string, case-blind),
- there is no traceback (``--debug`` is the way to see one),
- no run folder was created under the test's runs folder, and every file the case wrote
  (the user's inputs, an earlier output) is byte for byte what it was.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest


@dataclass(frozen=True)
class BadInput:
    """One bad input.

    Args:
        id: the test id (short, unique within a domain).
        args: runner arguments after the domain name; ``{tmp}`` is replaced by the case's folder.
        expect: strings the error paragraph must contain (file, row, column, option, what was expected).
        make: writes the case's files into the folder it is given (``None``: no files).
        code: the expected exit status.
    """

    id: str
    args: tuple[str, ...]
    expect: tuple[str, ...]
    make: Callable[[Path], None] | None = None
    code: int = 2
    marks: tuple = field(default_factory=tuple)


def params(cases: list[BadInput]) -> list:
    """``pytest.param`` per case, with its id and marks, for ``@pytest.mark.parametrize("case", ...)``."""
    return [pytest.param(case, id=case.id, marks=list(case.marks)) for case in cases]


def folder_digests(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its SHA-256, to show a refused command wrote nothing. Files of the W&B run
    (under ``wandb/``) count by name only: the W&B service of a fit run in this process goes on appending to its
    logs and run file after ``wandb.finish()`` returned (tests/test_wandb*.py), so their bytes are not ours to
    compare; a refused command that made a new W&B file is still caught."""

    def digest(path: Path) -> str:
        return "a W&B file" if "wandb" in path.relative_to(folder).parts[:-1] else hashlib.sha256(path.read_bytes()).hexdigest()

    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def check_refused(domain: str, case: BadInput, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``case`` through ``python -m pipelines.run DOMAIN`` and assert it is refused cleanly; return stderr."""
    from pipelines.run import main

    files = tmp_path / "files"
    files.mkdir()
    if case.make is not None:
        case.make(files)
    before = folder_digests(files)
    runs_dir = tmp_path / "runs"
    args = [domain, *(arg.replace("{tmp}", str(files)) for arg in case.args), "--runs_dir", str(runs_dir)]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out, err = capsys.readouterr()
    assert exit_info.value.code == case.code, f"exit status {exit_info.value.code}, expected {case.code}; stderr:\n{err[-3000:]}"
    assert "Traceback" not in err, f"a traceback was printed without --debug:\n{err[-3000:]}"
    assert "error:" in err, f"no 'error:' paragraph on stderr:\n{err[-3000:]}"
    assert "compute_fn" not in err and "object at 0x" not in err, f"the message carries parser internals, not one clear paragraph:\n{err[-3000:]}"
    message = err[err.index("error:") :]
    flat = " ".join(message.split()).lower()  # the paragraph is wrapped: compare with whitespace folded
    for expected in case.expect:
        assert " ".join(expected.split()).lower() in flat, f"{expected!r} is not in the error message:\n{message}"
    leftovers = [str(p.relative_to(runs_dir)) for p in runs_dir.rglob("*")] if runs_dir.exists() else []
    assert not leftovers, f"a refused command left files behind: {leftovers}"
    assert folder_digests(files) == before, "the case's input files were changed"
    return message
