"""Command-line errors as one paragraph a user can act on: a ``--config`` file that is not YAML or was
written for another domain, and jsonargparse's messages with "did you mean" for unknown options, keys
and choices (:class:`pipelines.cli.PipelineCLI`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from pipelines.errors import did_you_mean
from pipelines.csv_text import byte_order_mark


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that names a key twice (YAML itself lets the last one win)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (lines {seen[key]} and {key_node.start_mark.line + 1}): which one is meant?", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def config_file_problem(args: Any) -> str | None:
    """The first ``--config FILE`` of ``args`` that cannot be a config, named with what is wrong: not UTF-8
    text (a UTF-16 byte-order mark said so), empty, not valid YAML, a key given twice, or not a mapping."""
    for path in config_files(args):
        if not path.is_file():
            continue
        raw = path.read_bytes()
        marked = byte_order_mark(raw)
        if marked:
            encoding, shown = marked
            return f"--config {path}: {encoding.upper()} text (its byte-order mark {shown}), not UTF-8; re-save it as UTF-8 (e.g. iconv -f {encoding} -t utf-8)"
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            return f"--config {path}: byte offset {error.start} (0x{raw[error.start]:02x}) is not UTF-8 text; re-save the file as UTF-8"
        if not text.strip():
            return f"--config {path}: the file is empty; expected YAML sections such as 'trainer:', 'model:', 'data:'"
        try:
            content = yaml.load(text, Loader=UniqueKeyLoader)
        except yaml.YAMLError as error:
            return f"--config {path}: not valid YAML: {' '.join(str(error).split())}"
        if content is not None and not isinstance(content, dict):
            return f"--config {path}: holds a YAML {type(content).__name__}; expected a mapping of sections such as 'trainer:', 'model:', 'data:'"
    return None


DOMAIN_COMMENT = re.compile(r"^#\s*domain:\s*([\w-]+)\s*$", re.MULTILINE)
"""The line a sweep's ``best.yaml`` names its domain with (``# domain: finance``)."""


def config_files(args: Any) -> list[Path]:
    """The ``--config FILE`` paths of a command line (both spellings), in order."""
    if not isinstance(args, list):
        return []
    files = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg in ("--config", "-c")]
    return [Path(f) for f in files + [arg.split("=", 1)[1] for arg in args if isinstance(arg, str) and arg.startswith("--config=")]]


def foreign_config(args: Any, domain: str) -> str | None:
    """A ``--config`` file written for another domain (a sweep's ``best.yaml`` names it in a ``# domain:`` line, a
    run's or sweep's file lies under ``runs/<domain>/`` or ``sweeps/<domain>/``), as an error naming that domain."""
    from pipelines.domain_registry import available_domains

    domains = available_domains()
    for path in config_files(args):
        try:
            found = DOMAIN_COMMENT.search(path.read_text(errors="replace")[:4000])
        except OSError:
            continue
        owner = found.group(1) if found else next((b for a, b in zip(path.resolve().parts, path.resolve().parts[1:]) if a in ("runs", "sweeps") and b in domains), None)
        if owner and owner != domain:
            return (f"--config {path}: this config was written for the {owner} domain (its model and data options are {owner}'s), "
                    f"not {domain}; run `python -m pipelines.run {owner} --config {path}`, or give a {domain} config")  # fmt: skip
    return None


def _value_hint(message: str) -> str | None:
    """jsonargparse's refusal of a value (``Parser key "K": Expected a typing.Literal[...]. Got value: V``) as
    ``--K V: expected one of ...`` with a did-you-mean, or ``expected a finite number`` for nan/inf; also for an
    optional option (``float | None``), which jsonargparse refuses as a Union (``Given value: nan``)."""
    key = re.search(r'Parser key "([\w.\-]+)"', message)
    got = re.search(r"(?:Got|Given) value: (.*)$", message, re.MULTILINE)
    if key is None or got is None:
        return None
    option, value = f"--{key.group(1)}", got.group(1).strip()
    literal = re.search(r"Expected a typing\.Literal\[(.*?)\]", message, re.DOTALL)  # also inside an optional's Union text
    if literal:
        choices = re.findall(r"'([^']*)'", literal.group(1))
        same = [choice for choice in choices if choice.lower() == value.lower()]  # DDIM for ddim: difflib sees no likeness
        hint = f" (did you mean {same[0]!r}? the choices are case-sensitive)" if same else did_you_mean(value, choices)
        return f"{option} {value}: expected one of {', '.join(choices)}{hint}"
    kind = re.search(r"Expected a <class '(\w+)'>", message)
    if kind and kind.group(1) in ("float", "int"):
        number = "a finite number" if value.lower().lstrip("+-") in ("nan", "inf", "infinity") else f"a number ({kind.group(1)})"
        return f"{option} {value}: expected {number}"
    return None


def explain(message: str, options: list[str], domain: str, command: str = "") -> str:
    """jsonargparse's message, first line only, with "did you mean" for unknown options, keys and choices
    (``command``: the runner's sub-command whose ``--help`` lists the options, e.g. ``export``)."""
    value = _value_hint(message)
    if value:
        return f"{value}. `python -m pipelines.run {' '.join(filter(None, (domain, command)))} --help` lists every option."
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    first = (lines[0] if lines else message).rstrip(":")
    hints = []
    for unknown in re.findall(r"(--[\w.\-]+)", first if "nrecognized" in first else ""):
        alike = [o for o in options if o.count(".") == unknown.count(".")]
        hints.append(f"{unknown}{did_you_mean(unknown, alike) or ' is not an option'}")
    for key in re.findall(r'Key "([\w.\-]+)" is not expected|does not accept option \'([\w.\-]+)\'|^Option \'([\w.\-]+)\' is not accepted', message):
        key = "".join(key)
        suggestion = did_you_mean("--" + key, options).replace("'--", "'")
        hints.append(f"config key {key!r}{suggestion or ' is not an option'}")
    for class_path, option in re.findall(r"class_path '([\w.]+)':\s*Option '([\w.]+)' is not accepted", message):
        name = class_path.rpartition(".")[2]
        hints.append(f"option {option!r} is not accepted by {class_path} (its options: `python -m pipelines.run {domain} --model.help {name}`)")
    detail = "; ".join(dict.fromkeys(hints))
    detail = f" {detail}." if detail else ("; " + " ".join(lines[1:3]) if len(lines) > 1 else "")
    return f"{first}.{detail} `python -m pipelines.run {' '.join(filter(None, (domain, command)))} --help` lists every option."


def unknown_environment_options(options: list[str], environ: dict[str, str], prefix: str = "PIPELINES") -> str | None:
    """A ``PIPELINES_<COMMAND>__<OPTION>`` variable that names no option (``--data.batch_size`` is
    ``PIPELINES_FIT__DATA__BATCH_SIZE``): jsonargparse reads only the names it knows, so a misspelt one was ignored
    in silence while the same key in a config file is refused (trial finding: a job's ``..._MAX_EPOCH=1`` trained 15
    epochs). Arguments of a class chosen at run time (``__INIT_ARGS__``) have no variable of their own: refused with the way that works.

    Example:
        >>> unknown_environment_options(["--data.batch_size", "--trainer.max_epochs"], {"PIPELINES_FIT__DATA__BATCHSIZE": "7"})
        "environment variable PIPELINES_FIT__DATA__BATCHSIZE names no option of the command (did you mean 'PIPELINES_FIT__DATA__BATCH_SIZE'?): a variable with a misspelt name would be ignored; the names are PIPELINES_<COMMAND>__<OPTION>, with each '.' of the option as '__' (--data.batch_size: PIPELINES_FIT__DATA__BATCH_SIZE)"
        >>> unknown_environment_options(["--data.batch_size"], {"PIPELINES_FIT__DATA__BATCH_SIZE": "7", "PIPELINES_DEBUG": "1"}) is None
        True
    """
    commands = ("FIT", "VALIDATE", "TEST", "PREDICT")
    known = {f"{prefix}_{command}__{option.lstrip('-').replace('.', '__').upper()}" for command in commands for option in options}
    known |= {f"{prefix}_{command}__CONFIG" for command in commands}
    for name in sorted(environ):
        if not any(name.startswith(f"{prefix}_{command}__") for command in commands) or name in known:
            continue
        if "__INIT_ARGS__" in name or "__DICT_KWARGS__" in name:  # jsonargparse reads no variable per argument of a class chosen at run time
            section = name.split("__INIT_ARGS__")[0].split("__DICT_KWARGS__")[0]
            return (
                f"environment variable {name}: the arguments of a class chosen at run time are not read one variable each, so it "
                f"would be ignored; set {section} to the whole value instead (e.g. {section}='{{\"class_path\": ..., \"init_args\": {{...}}}}'), "
                "or use --config FILE.yaml"
            )
        return (
            f"environment variable {name} names no option of the command{did_you_mean(name, [k for k in known if k.split('__')[:2] == name.split('__')[:2]] or known)}: a variable with a misspelt name "
            f"would be ignored; the names are {prefix}_<COMMAND>__<OPTION>, with each '.' of the option as '__' "
            f"(--data.batch_size: {prefix}_FIT__DATA__BATCH_SIZE)"
        )
    return None


def single_dash_option(args: Any, options: list[str]) -> str | None:
    """``-ckpt_path best``: argparse reads a one-dash word as its short options (``-c kpt_path``: a config file named
    ``kpt_path``, trial finding); a word that is an option with two dashes is refused naming it.

    Example:
        >>> single_dash_option(["predict", "-ckpt_path", "best"], ["--ckpt_path", "--config"])
        "-ckpt_path: options take two dashes (did you mean '--ckpt_path'?); with one, '-c' would read the rest as its value"
        >>> single_dash_option(["-c", "run.yaml"], ["--config"]) is None
        True
    """
    if not isinstance(args, (list, tuple)):
        return None
    for arg in args:
        if not isinstance(arg, str) or not arg.startswith("-") or arg.startswith("--") or len(arg) < 3:
            continue
        name = "--" + arg[1:].split("=", 1)[0]
        if name in options:
            return f"{arg.split('=', 1)[0]}: options take two dashes (did you mean {name!r}?); with one, {arg[:2]!r} would read the rest as its value"
    return None
