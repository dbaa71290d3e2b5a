"""One spelling for long options across the commands: words joined by ``_`` (``--max_batch_size``).

The runner's options are LightningCLI's and spelt that way (``--ckpt_path``, ``--trainer.max_epochs``),
so every command spells its own options alike (retrain's ``--warm_start``, serve's ``--max_batch_size``).
The other spelling (``--max-batch-size``, ``--warm-start``) is still accepted, with a warning on stderr,
so that scripts and cron jobs written for an older spelling keep working.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any


def canonical(option: str) -> str:
    """``--max-batch-size`` -> ``--max_batch_size`` (a long option's words joined by ``_``).

    Example:
        >>> canonical("--max-batch-size"), canonical("--warm_start"), canonical("-h")
        ('--max_batch_size', '--warm_start', '-h')
    """
    return "--" + option[2:].replace("-", "_") if option.startswith("--") else option


def respell(args: Sequence[str], known: set[str], prog: str) -> list[str]:
    """``args`` with each long option spelt with ``-`` between words replaced by its ``_`` spelling
    when only that one is an option of the command (``known``); each replacement is warned about.

    Example:
        >>> import contextlib, io
        >>> with contextlib.redirect_stderr(io.StringIO()) as err:
        ...     respell(["--max-batch-size=8", "--port", "8000"], {"--max_batch_size", "--port"}, "serve")
        ['--max_batch_size=8', '--port', '8000']
        >>> print(err.getvalue(), end="")
        [pipelines] warning: serve: --max-batch-size is deprecated, spell it --max_batch_size
    """
    spelt = []
    for position, arg in enumerate(args):
        if arg == "--":  # what follows is positional
            return spelt + list(args[position:])
        name, equals, value = arg.partition("=")
        if name.startswith("--") and name not in known and canonical(name) in known:
            print(f"[pipelines] warning: {prog}: {name} is deprecated, spell it {canonical(name)}", file=sys.stderr)
            arg = canonical(name) + equals + value
        spelt.append(arg)
    return spelt


class OptionParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` of a command: options declared with ``_`` between words; the same
    option with ``-`` between words is accepted as a deprecated spelling (:func:`respell`)."""

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> tuple[Any, list[str]]:  # type: ignore[override]
        args = list(sys.argv[1:] if args is None else args)
        known = {option for action in self._actions for option in action.option_strings}
        return super().parse_known_args(respell(args, known, self.prog), namespace)


class OneLineParser(OptionParser):
    """An :class:`OptionParser` for the commands a scheduler runs (``retrain``, ``registry``): a usage error
    (an unknown option, a missing or malformed value) is one line on stderr naming it, then exit 2; no usage
    block (``--help`` shows it). Sub-command parsers made with ``add_subparsers`` are of this class too."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = " ".join(self.prog.split()[:3])  # "python -m pipelines.registry", also for a sub-command's parser
        self.exit(2, f"{command}: error: {message} (`{command} --help` shows the usage)\n")
