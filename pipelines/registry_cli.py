"""``python -m pipelines.registry DOMAIN COMMAND [--registry DIR]``: read and change a model registry.

    list                              the history table, the versions, the aliases
    show [VERSION|ALIAS]              one version's metadata, verified (default: the champion)
    promote VERSION                   make VERSION the champion (``rollback`` returns)
    rollback                          back to the previous champion
    alias [list|set NAME VERSION|rm NAME]   named pointers beyond the champion (staging, canary)
    repin --reason WHY [--eval_config FILE] [runner data options]
                                      replace the evaluation set (a new snapshot) and re-score the champion
    gc --keep N [--runs_dir DIR]      retention: remove old versions and attempt run folders
    verify                            check every pointer and checksum; exit 1 on a problem

Exit codes: 0 done, 1 error (the message names the path), 2 bad command line or input, in one line (an
unknown domain, command, option, version or alias, with a did-you-mean; no registry at ``--registry``;
a rollback with no previous champion), 5 locked. Every
change holds the registry lock and is recorded in the history. The W&B mirror
(:func:`publish_to_wandb`, :func:`move_wandb_alias`) runs after the folder changed, best effort.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from pipelines.errors import InputError, did_you_mean
from pipelines.model_registry import (
    CONFIG_FILE, DEFAULT_REGISTRY, EXTRAS_FILE, HISTORY_FILE, METADATA_FILE, PREPROCESSING_FILE, REGISTRY_ENV, WEIGHTS_FILE, ModelRegistry, RegistryError, RegistryLocked,
    alias_name_problem,
    read_history,
)  # fmt: skip
from pipelines.option_spelling import OneLineParser
from pipelines.stops import sigterm_as_exit

LOCKED = 5  # the same code as pipelines.retrain_steps.ExitCode.LOCKED


# ----- W&B mirror ------------------------------------------------------------------------------
def publish_to_wandb(registry: ModelRegistry, version: str, aliases: list[str], group: str) -> str:
    """Log a version as a W&B model artifact (``<domain>-model``) with ``aliases``; return what happened.

    Only when W&B is online (``WANDB_MODE`` online or an API key; :func:`pipelines.tracking.wandb_mode`);
    called after the registry folder has been updated, and every error is caught and reported, so
    an offline or unreachable W&B never blocks or undoes a promotion.
    """
    from pipelines.tracking import wandb_mode

    mode = wandb_mode()
    if mode in ("offline", "disabled", "dryrun"):
        return f"skipped (WANDB_MODE={mode})"
    try:
        import wandb

        folder = registry.version_dir(version)
        run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", f"domain-pipelines-{registry.domain}"),
            job_type="registry",
            group=group,
            name=f"registry-{version}",
            settings=wandb.Settings(init_timeout=30),
            reinit="finish_previous",
            mode=mode,
        )
        artifact = wandb.Artifact(f"{registry.domain}-model", type="model", metadata=registry.metadata(version))
        for name in (WEIGHTS_FILE, EXTRAS_FILE, PREPROCESSING_FILE, CONFIG_FILE, METADATA_FILE):
            artifact.add_file(str(folder / name), name=name)
        run.log_artifact(artifact, aliases=[version, *aliases])
        run.finish()
        return f"logged {registry.domain}-model ({', '.join([version, *aliases])})"
    except Exception as error:  # noqa: BLE001 - the registry folder is the source of truth
        print(f"[registry] W&B unreachable, artifact not logged (the registry folder is up to date): {error}", file=sys.stderr)
        return f"failed: {error}"


def move_wandb_alias(registry: ModelRegistry, version: str, alias: str = "champion") -> str:
    """Move a W&B alias to the artifact of ``version`` (manual promote/rollback); best effort, online only."""
    from pipelines.tracking import wandb_mode

    mode = wandb_mode()
    if mode in ("offline", "disabled", "dryrun"):
        return f"skipped (WANDB_MODE={mode})"
    try:
        import wandb

        api = wandb.Api(timeout=30)
        project = os.environ.get("WANDB_PROJECT", f"domain-pipelines-{registry.domain}")
        entity = os.environ.get("WANDB_ENTITY") or api.default_entity
        artifact = api.artifact(f"{entity}/{project}/{registry.domain}-model:{version}")
        artifact.aliases = sorted(set(artifact.aliases) | {alias})
        artifact.save()
        return f"alias {alias} -> {version}"
    except Exception as error:  # noqa: BLE001
        print(f"[registry] W&B alias not moved (the registry folder is up to date): {error}", file=sys.stderr)
        return f"failed: {error}"


# ----- history table ---------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else str(value))


def format_history(rows: list[dict[str, Any]], champion: str | None = None) -> str:
    """The history as a fixed-width table (one line per attempt or manual change)."""
    headers = ["time", "decision", "challenger", "score", "champion", "score", "metric", "fingerprint", "commit", "run"]
    lines = []
    for row in rows:
        challenger, incumbent = row.get("challenger") or {}, row.get("champion") or {}
        lines.append([
            str(row.get("time", "-"))[:19].replace("T", " "),
            row.get("decision", "-"),
            _fmt(challenger.get("version")) + ("*" if champion and challenger.get("version") == champion else ""),
            _fmt(challenger.get("score")),
            _fmt(incumbent.get("version")),
            _fmt(incumbent.get("score")),
            _fmt(row.get("metric")) + ({"max": " ↑", "min": " ↓"}.get(row.get("mode", ""), "")),
            str(row.get("fingerprint") or "-")[:12],
            str(row.get("git_commit") or "-")[:10] + ("+" if str(row.get("git_commit", "")).endswith("-dirty") else ""),
            Path(str(row.get("run_dir"))).name if row.get("run_dir") else "-",
        ])  # fmt: skip
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
    render = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [headers, *lines]]
    render.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(render)


def _parser() -> argparse.ArgumentParser:
    common = OneLineParser(add_help=False)
    common.add_argument("--registry", type=Path, default=argparse.SUPPRESS, help=f"registry folder (default: ${REGISTRY_ENV} or ./{DEFAULT_REGISTRY})")
    parser = OneLineParser(prog="python -m pipelines.registry", description="Read and change a domain's model registry.", parents=[common])
    parser.add_argument("domain")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the history table, the versions and the aliases", parents=[common])
    show = commands.add_parser("show", help="one version's metadata, verified (default: the champion)", parents=[common])
    show.add_argument("version", nargs="?", help="a version or an alias")
    promote = commands.add_parser("promote", help="make VERSION the champion", parents=[common])
    promote.add_argument("version")
    commands.add_parser("rollback", help="make the previous champion the champion again", parents=[common])
    alias = commands.add_parser("alias", help="named pointers beyond the champion: list | set NAME VERSION | rm NAME", parents=[common])
    alias.add_argument("action", choices=["list", "set", "rm"], nargs="?", default="list")
    alias.add_argument("name", nargs="?")
    alias.add_argument("version", nargs="?")
    repin = commands.add_parser("repin", help="replace the evaluation set (a new snapshot) and re-score the champion on it", parents=[common])
    repin.add_argument("--reason", required=True, help="why (recorded in the history)")
    repin.add_argument("--eval_config", type=Path, default=None, help="YAML whose data section is the new evaluation set (else: the domain defaults plus the runner options given)")
    gc = commands.add_parser("gc", help="retention: remove old versions and attempt run folders", parents=[common])
    gc.add_argument("--keep", type=int, required=True, help="versions and attempts to keep (the champion, its rollback chain and aliased versions are always kept)")
    gc.add_argument("--runs_dir", type=Path, action="append", default=[], help="runs folder of the attempts (default: the ones the history names)")
    commands.add_parser("verify", help="check every pointer (champion, rollback chain, aliases), checksum and the evaluation pin", parents=[common])
    return parser


COMMANDS = ("list", "show", "promote", "rollback", "alias", "repin", "gc", "verify")


def unknown_words(argv: list[str]) -> str | None:
    """An unknown domain or command among the first two words of ``argv`` (``--registry DIR`` skipped), with a did-you-mean."""
    from pipelines.domain_registry import available_domains

    words, skip = [], False
    for arg in argv:
        if skip or arg.startswith("-"):
            skip = arg == "--registry"
            continue
        words.append(arg)
    domains = available_domains()
    if words and words[0] not in domains:
        return f"unknown domain {words[0]!r}{did_you_mean(words[0], domains)}; the domains are {', '.join(domains)}"
    if len(words) > 1 and words[1] not in COMMANDS:
        return f"unknown command {words[1]!r}{did_you_mean(words[1], COMMANDS)}; the commands are {', '.join(COMMANDS)}"
    return None


def named_version(registry: ModelRegistry, name: str | None) -> str:
    """The version a command line names (a version, an alias, ``champion`` or nothing: the champion), or
    :class:`InputError` naming the versions and aliases (with a did-you-mean) when there is no such one."""
    version = registry.resolve(name)
    if version not in registry.versions() and (name in (None, "champion") or name in registry.aliases()):  # a pointer to a version that is gone
        pointer = "champion" if name in (None, "champion") else f"alias {name!r}"
        raise RegistryError(f"{pointer} names {version}, which is not in {registry.versions_dir} (a broken pointer; "
                            f"`python -m pipelines.registry {registry.domain} verify` lists every problem)")  # fmt: skip
    if name is not None and version not in registry.versions():
        known = [*registry.versions(), *registry.aliases()]
        raise InputError(f"no version or alias {name!r} in {registry.path}{did_you_mean(name, known)} (versions: {', '.join(registry.versions()) or 'none'}; "
                         f"aliases: {', '.join(registry.aliases()) or 'none'})")  # fmt: skip
    return version


def main(argv: list[str] | None = None) -> int:
    """The command line (module docstring); returns the exit code."""
    parser = _parser()
    unknown = unknown_words(sys.argv[1:] if argv is None else argv)
    if unknown:
        print(f"error: {unknown}. `python -m pipelines.registry --help` shows the usage.", file=sys.stderr)
        return 2
    try:  # a usage error is one line and exit 2 (OneLineParser), returned rather than raised
        args, rest = parser.parse_known_args(argv)
        if rest and args.command != "repin":
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.command == "alias" and ((args.action == "set" and not args.version) or (args.action != "list" and not args.name)):
            parser.error("alias set NAME VERSION | alias rm NAME | alias list")
        if args.command == "alias" and args.action != "list" and alias_name_problem(args.name, args.domain):
            parser.error(str(alias_name_problem(args.name, args.domain)))
        if args.command == "gc" and args.keep < 1:
            parser.error(f"--keep {args.keep}: keep at least 1 version")
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 2
    registry = ModelRegistry(getattr(args, "registry", None) or default_registry_path(), args.domain)
    if not registry.path.is_dir():  # a wrong --registry (or $PIPELINES_REGISTRY): bad input, never created here
        print(f"error: no registry for {args.domain!r} at {registry.path} (give the registry folder with --registry DIR or ${REGISTRY_ENV})", file=sys.stderr)
        return 2
    try:
        with sigterm_as_exit(f"registry {args.command}"):  # clean-up runs (partial versions, snapshots), exit 143
            return _run(args, rest, registry)
    except RegistryLocked as error:
        print(f"locked: {error}", file=sys.stderr)
        return LOCKED
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RegistryError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def default_registry_path() -> Path:
    from pipelines.model_registry import default_registry

    return default_registry()


def _run(args: argparse.Namespace, rest: list[str], registry: ModelRegistry) -> int:
    who = {"host": socket.gethostname(), "user": os.environ.get("USER")}
    if args.command == "list":
        champion = registry.champion()
        rows, damage = read_history(registry.path / HISTORY_FILE)  # the rows that parse are shown even when a line is damaged
        print(format_history(rows, champion))
        aliases = ", ".join(f"{k}={v}" for k, v in registry.aliases().items()) or "none"
        print(f"\nchampion: {champion or 'none'}   aliases: {aliases}   versions: {', '.join(registry.versions()) or 'none'}   (* = current champion)")
        for text in damage:
            print(f"error: {text}: not shown above; retraining and changes refuse this registry until it is restored (`registry {args.domain} verify`)", file=sys.stderr)
        return 1 if damage else 0
    elif args.command == "show":
        version = named_version(registry, args.version)
        metadata = registry.verify_version(version)
        names = [k for k, v in registry.aliases().items() if v == version]
        print(json.dumps({**metadata, "champion": version == registry.champion(), "aliases": names}, indent=2, default=str))
    elif args.command == "verify":
        problems = registry.verify()
        print("\n".join(problems) or f"{registry.path}: valid (champion {registry.champion() or 'none'}, {len(registry.versions())} version(s))")
        return 1 if problems else 0
    elif args.command == "alias" and args.action == "list":
        print(json.dumps({"champion": registry.champion(), **registry.aliases()}, indent=2))
    elif args.command == "alias":
        check_alias(registry, args.name, removing=args.action == "rm")
        with registry.lock():
            version = named_version(registry, args.version) if args.action == "set" else None
            before = registry.set_alias(args.name, version)
            registry.append_history({"decision": f"alias-{args.action}", "domain": args.domain, "alias": args.name, "challenger": {"version": version}, "champion": {"version": before}, **who})
        note = move_wandb_alias(registry, version, args.name) if version else "skipped (removal)"
        print(f"alias {args.name}: {before or 'none'} -> {version or 'none'}  (W&B: {note})")
    elif args.command == "repin":
        return _repin(args, rest, registry, who)
    elif args.command == "gc":
        from pipelines.registry_upkeep import known_runs_dirs, prune

        with registry.lock():
            dirs = [d / args.domain for d in args.runs_dir] or known_runs_dirs(registry)
            result = prune(registry, args.keep, dirs)
        print(f"removed versions: {', '.join(result['removed']) or 'none'}; run folders: {len(result['run_folders'])}; snapshots: {len(result['snapshots'])}")
    else:
        with registry.lock():
            before = registry.champion()
            if args.command == "rollback" and len(registry.rollback_chain()) < 2:
                raise InputError(f"{registry.path / 'champion.json'}: no previous champion to roll back to (champion: {before or 'none'}); "
                                 f"`python -m pipelines.registry {args.domain} promote VERSION` sets one by hand")  # fmt: skip
            record = registry.set_champion(named_version(registry, args.version), "manual promote") if args.command == "promote" else registry.rollback()
            registry.append_history({"decision": f"manual-{args.command}", "domain": args.domain, "challenger": {"version": record["version"]}, "champion": {"version": before}, **who})
        wandb_note = move_wandb_alias(registry, record["version"])
        print(f"champion: {before or 'none'} -> {record['version']}  (W&B: {wandb_note})")
    return 0


def check_alias(registry: ModelRegistry, name: str, removing: bool) -> None:
    """:class:`InputError` for an alias to remove that the registry does not have (with a did-you-mean)."""
    aliases = registry.aliases()
    if removing and name not in aliases:
        raise InputError(f"no alias {name!r} in {registry.path}{did_you_mean(name, aliases)} (aliases: {', '.join(aliases) or 'none'})")


def _repin(args: argparse.Namespace, rest: list[str], registry: ModelRegistry, who: dict[str, Any]) -> int:
    from pipelines.evaluation_set import repin
    from pipelines.registry_upkeep import check_writable
    from pipelines.retrain_steps import RetrainError, resolve_config

    if args.eval_config is not None and not args.eval_config.is_file():
        print(f"error: --eval_config {args.eval_config}: no such file", file=sys.stderr)
        return 2
    try:
        with registry.lock():
            check_writable(registry)
            config = resolve_config(args.domain, [*(["--config", str(args.eval_config)] if args.eval_config else []), *rest])
            row = repin(registry, config, args.reason)
            print(f"evaluation set: {str(row['evaluation']['old'])[:12]} -> {row['evaluation']['new'][:12]} ({args.reason})")
    except RetrainError as error:
        print(f"error: {error}", file=sys.stderr)
        return int(error.code)
    return 0
