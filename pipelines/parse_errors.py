"""Command-line errors as one paragraph a user can act on: a ``--config`` file that is not YAML, and
jsonargparse's messages with "did you mean" for unknown options and keys (:class:`pipelines.cli.PipelineCLI`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from pipelines.errors import did_you_mean


def broken_yaml(args: Any) -> str | None:
    """The first ``--config FILE`` of ``args`` that is not valid YAML, as an error naming the file and line."""
    files = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg in ("--config", "-c")] if isinstance(args, list) else []
    files += [arg.split("=", 1)[1] for arg in args if isinstance(arg, str) and arg.startswith("--config=")] if isinstance(args, list) else []
    for name in files:
        path = Path(name)
        if not path.is_file():
            continue
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            return f"--config {path}: not valid YAML: {' '.join(str(error).split())}"
    return None


def explain(message: str, options: list[str], domain: str, command: str = "") -> str:
    """jsonargparse's message, first line only, with "did you mean" for unknown options and keys
    (``command``: the runner's sub-command whose ``--help`` lists the options, e.g. ``export``)."""
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
