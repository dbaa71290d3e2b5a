"""How the project talks to its user (docs/development.md, "Messages").

- A command's ``main`` (the part that reads ``argv``) prints what the user asked for: the result on
  stdout, an error as one paragraph on stderr (:func:`pipelines.errors.paragraph`).
- Everything else says what it is doing through ``logging.getLogger(__name__)``: ``info`` for a note,
  ``warning`` for something the user should act on. :func:`show_messages`, called by a command's
  ``main``, shows the records of the ``pipelines`` and ``domains`` loggers on stderr as
  ``[pipelines] ...`` or ``[<domain>] ...``, from rank zero only (a DDP run says each thing once).

Example:
    >>> import io, contextlib, logging
    >>> show_messages()
    >>> with contextlib.redirect_stderr(io.StringIO()) as err:
    ...     logging.getLogger("domains.finance.data").info("the checkpoint's split: by time")
    ...     logging.getLogger("pipelines.cli").warning("no last.ckpt yet")
    >>> print(err.getvalue(), end="")
    [finance] the checkpoint's split: by time
    [pipelines] warning: no last.ckpt yet
"""

from __future__ import annotations

import logging
import sys

#: The loggers whose records :func:`show_messages` shows (the project's two packages).
LOGGERS = ("pipelines", "domains")
#: The name of the handler :func:`show_messages` adds (found again by name: added once per logger).
HANDLER = "pipelines.messages"


class _CurrentStderr(logging.Handler):
    """Writes each record to ``sys.stderr`` as it is when the record comes (a redirect is followed)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging's own convention: a broken stream never breaks the caller
            self.handleError(record)


class _Labelled(logging.Formatter):
    """``[pipelines] message`` for ``pipelines.*``, ``[finance] message`` for ``domains.finance.*``."""

    def format(self, record: logging.LogRecord) -> str:
        parts = record.name.split(".")
        label = parts[1] if parts[0] == "domains" and len(parts) > 1 else parts[0]
        warning = "warning: " if record.levelno >= logging.WARNING else ""
        return f"[{label}] {warning}{record.getMessage()}"


def _on_rank_zero(record: logging.LogRecord) -> bool:
    """False in a DDP worker other than rank zero (the rank Lightning set; 0 when Lightning is not loaded)."""
    rank_zero = getattr(sys.modules.get("lightning_utilities.core.rank_zero"), "rank_zero_only", None)
    return getattr(rank_zero, "rank", 0) == 0


def show_messages(level: int = logging.INFO) -> None:
    """Show the project's log records of ``level`` and above on stderr (a command's ``main`` calls it; calling it again changes nothing)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(handler.get_name() == HANDLER for handler in logger.handlers):
            handler = _CurrentStderr()
            handler.set_name(HANDLER)
            handler.setFormatter(_Labelled())
            handler.addFilter(_on_rank_zero)
            logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False  # shown once, here, whatever the root logger does
