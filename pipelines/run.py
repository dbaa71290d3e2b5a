"""``python -m pipelines.run DOMAIN [fit|validate|test|predict] [options]``.

A domain dispatcher in front of LightningCLI: it reads the domain name, finds its spec in the
registry, serves ``--help`` from a cache (:mod:`pipelines.help_cache`) and hands ``export`` to
:mod:`pipelines.export`, everything else to :func:`pipelines.cli.run_domain` (which assumes ``fit``,
followed by a test of the best checkpoint, when no sub-command is given).

Examples::

    python -m pipelines.run healthcare                            # fit, then test the best checkpoint
    python -m pipelines.run healthcare --help                     # every option of the domain
    python -m pipelines.run healthcare --config pipelines/configs/debug.yaml
    python -m pipelines.run healthcare fit --ckpt_path last       # resume the newest run
    python -m pipelines.run healthcare test --ckpt_path best --run_id 20261125-101500-3f2a9c
    python -m pipelines.run healthcare export --ckpt_path best --format onnx

Exit status (:mod:`pipelines.errors`): 0 success; 2 bad input or options, refused before anything
is written; 1 a crash, a diverged run or a non-finite test metric; 143 / 130 a fit stopped by
SIGTERM / SIGINT after writing ``last.ckpt``. Errors are one paragraph; ``--debug`` (or
``PIPELINES_DEBUG=1``) shows the traceback.
"""

from __future__ import annotations

import sys

from pipelines.domain_registry import available_domains, get_domain
from pipelines.errors import EXIT_BAD_INPUT, EXIT_CRASH, EXIT_SIGINT, InputError, RunStopped, crash_message, debug_requested, paragraph
from pipelines.help_cache import cached_help, is_help_request
from pipelines.messages import show_messages

USAGE = "usage: python -m pipelines.run DOMAIN [fit|validate|test|predict|export] [--config FILE.yaml] [--help] [options]"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [arg for arg in argv if arg != "--debug"]
    show_messages()  # what the run's code logs reaches stderr as [pipelines] ... / [<domain>] ... (pipelines/messages.py)
    command = " ".join(argv[:2]) if argv[1:2] and not argv[1].startswith("-") else " ".join(argv[:1] + ["fit"])
    try:
        dispatch(argv)
    except (InputError, RunStopped) as error:
        if debug:
            raise
        print(paragraph(str(error)), file=sys.stderr)
        raise SystemExit(error.exit_code if isinstance(error, RunStopped) else EXIT_BAD_INPUT) from None
    except KeyboardInterrupt:
        if debug:
            raise
        print(paragraph(f"{command} interrupted (SIGINT)"), file=sys.stderr)
        raise SystemExit(EXIT_SIGINT) from None
    except Exception as error:
        if debug:
            raise
        print(paragraph(crash_message(error, command)), file=sys.stderr)
        raise SystemExit(EXIT_CRASH) from None


def dispatch(argv: list[str]) -> None:
    """Find the domain and hand the rest to its export command or to :func:`pipelines.cli.run_domain`."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print("domains: " + ", ".join(available_domains()))
        raise SystemExit(0 if argv else 2)
    try:
        spec = get_domain(argv[0])
    except ValueError as error:
        raise InputError(f"{error}\n{USAGE}") from None
    if argv[1:2] == ["export"]:
        from pipelines.export import main as export

        export(spec, argv[2:])
        return
    args = argv[1:]

    def start() -> None:
        from pipelines.cli import run_domain  # heavy: torch, Lightning and the domain's libraries

        run_domain(spec, args)

    if is_help_request(args):
        cached_help(spec.name, spec.config.parent, args, start)
    else:
        start()


if __name__ == "__main__":
    main()
