"""How a command ends when it cannot succeed: exit codes and the one paragraph a user reads.

Exit codes of ``python -m pipelines.run`` (and of every command built on it):

====  ==========================================================================================
0     success
1     a crash, a diverged run (non-finite loss) or a non-finite test metric
2     bad input or options: refused before the run folder or the W&B run exist
130   stopped by SIGINT (Ctrl+C): during ``fit`` ``checkpoints/last.ckpt`` holds where it stopped; during
      ``test``/``validate``/``predict`` its outputs are absent (partial files removed), earlier ones kept
143   stopped by SIGTERM (a scheduler's stop); likewise
====  ==========================================================================================

Errors print as one paragraph (``error: ...``) without a traceback; ``--debug`` (or
``PIPELINES_DEBUG=1``) re-raises them with the traceback.
"""

from __future__ import annotations

import difflib
import os
import textwrap
from collections.abc import Iterable

EXIT_CRASH = 1
EXIT_BAD_INPUT = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class InputError(ValueError):
    """Bad input or options, found before anything was written: the command exits 2."""


class RunStopped(Exception):
    """A run that stopped before it succeeded (a signal, divergence, a NaN metric).

    Args:
        message: what happened and what was kept (e.g. the checkpoint to resume from).
        exit_code: the process's exit status.
    """

    def __init__(self, message: str, exit_code: int = EXIT_CRASH) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def debug_requested(argv: list[str], environ: dict[str, str] | os._Environ = os.environ) -> bool:
    """``--debug`` on the command line or ``PIPELINES_DEBUG=1`` in the environment."""
    return "--debug" in argv or environ.get("PIPELINES_DEBUG", "").lower() in ("1", "true", "yes")


def did_you_mean(name: str, choices: Iterable[str], cutoff: float = 0.6) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or an empty string.

    Example:
        >>> did_you_mean("--model.lrr", ["--model.lr", "--data.path"])
        " (did you mean '--model.lr'?)"
        >>> did_you_mean("--zzz", ["--model.lr"])
        ''
    """
    close = difflib.get_close_matches(name, list(choices), n=2, cutoff=cutoff)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


def paragraph(message: str, width: int = 100) -> str:
    """``error: <message>`` wrapped as one paragraph (the message's own line breaks are kept)."""
    lines = str(message).strip().splitlines() or [""]
    return "\n".join(textwrap.fill(line, width, subsequent_indent="  ", break_on_hyphens=False, break_long_words=False) for line in ["error: " + lines[0], *lines[1:]])


def crash_message(error: BaseException, command: str) -> str:
    """The paragraph for an unexpected exception: its type, its message and how to see more."""
    text = str(error).strip().splitlines()
    return f"{command} crashed: {type(error).__name__}: {text[-1] if text else ''}\n(rerun with --debug or PIPELINES_DEBUG=1 for the traceback)"
