"""``python -m pipelines.run DOMAIN [fit|validate|test|predict] [options]``.

A domain dispatcher in front of LightningCLI: it reads the domain name, finds its spec in the
registry, assumes ``fit`` (followed by a test of the best checkpoint) when no sub-command is
given, and hands everything else to :class:`pipelines.cli.PipelineCLI`.

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
from pipelines.errors import EXIT_BAD_INPUT, EXIT_CRASH, EXIT_SIGINT, InputError, RunStopped, crash_message, debug_requested, did_you_mean, paragraph
from pipelines.help_cache import cached_help, is_help_request
from pipelines.runs import SUBCOMMANDS
USAGE = "usage: python -m pipelines.run DOMAIN [fit|validate|test|predict|export] [--config FILE.yaml] [--help] [options]"


def split_command(argv: list[str]) -> tuple[str, list[str], bool]:
    """Return (domain, arguments for LightningCLI, whether to test after fitting)."""
    domain, rest = argv[0], list(argv[1:])
    if rest and rest[0] in SUBCOMMANDS:
        return domain, rest, False
    if rest and not rest[0].startswith("-"):  # no sub-command takes a positional argument: a misspelt sub-command
        known = [*SUBCOMMANDS, "export"]
        raise InputError(f"unknown sub-command {rest[0]!r}{did_you_mean(rest[0], known)} (one of {', '.join(known)}).\n{USAGE}")
    informational = any(arg in ("-h", "--help") or arg.startswith("--print_config") for arg in rest)
    return domain, ["fit", *rest], not informational


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [arg for arg in argv if arg != "--debug"]
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
    """Find the domain and hand the rest to its export command or to :class:`pipelines.cli.PipelineCLI`."""
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
    domain, args, test_after_fit = split_command(argv)

    def start() -> None:
        from pipelines.cli import PipelineCLI  # heavy: torch, Lightning and the domain's libraries

        PipelineCLI(spec, args, test_after_fit=test_after_fit)

    if is_help_request(args):
        cached_help(domain, spec.config.parent, args, start)
    else:
        start()


if __name__ == "__main__":
    main()
