"""With ``--ckpt_path``, model options given on the command line must not be dropped in silence.

LightningCLI builds the model of ``fit/validate/test/predict --ckpt_path CKPT`` from the
hyper-parameters saved in the checkpoint, which replace the model options parsed from the command
line (``LightningCLI`` parses the checkpoint's hyper-parameters over the config). An option such as
``predict --ckpt_path best --model.init_args.sampling_steps 10`` was therefore accepted and ignored
(exit 0, the checkpoint's value used). :func:`check_model_options_kept` refuses such an option when
its value differs from the checkpoint's, naming the option, both values and what to do instead; an
option equal to the checkpoint's value (scripts that repeat the training options) passes.

Example:
    >>> check_model_options_kept(["predict", "--model.init_args.width=16"], {"width": 16}, "--ckpt_path best")
    >>> check_model_options_kept(["predict", "--model.init_args.width", "32"], {"width": 16}, "--ckpt_path best")
    Traceback (most recent call last):
    ...
    pipelines.errors.InputError: --model.init_args.width 32: with --ckpt_path best the model is built from the checkpoint's options (width: 16 there), so this option would be ignored. Leave it out; options that apply when generating or predicting are data options (see --help), and a model with other options needs a new training run
    >>> check_model_options_kept(["fit", "--model.batches_per_step=3"], {"batches_per_step": 1}, "--ckpt_path last")
    Traceback (most recent call last):
    ...
    pipelines.errors.InputError: --model.batches_per_step 3: with --ckpt_path last the run continues with the checkpoint's batches_per_step (1): it trains the same model, but the loop position saved in the checkpoint counts steps of that many mini-batches, so another value would resume at another mini-batch. Leave it out; a new training run (without --ckpt_path) can use any value
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import yaml

from pipelines.errors import InputError

#: what a ``--model.X`` option may be that is not a hyper-parameter of the model
STRUCTURE = ("class_path", "init_args", "dict_kwargs")

#: model options that change how the loop trains, not the model: why a resume keeps the checkpoint's value
LOOP_OPTIONS = {
    "batches_per_step": (
        "the run continues with the checkpoint's batches_per_step ({saved!r}): it trains the same model, but the loop "
        "position saved in the checkpoint counts steps of that many mini-batches, so another value would resume at another "
        "mini-batch. Leave it out; a new training run (without --ckpt_path) can use any value"
    ),
}


def model_options(argv: Sequence[str]) -> Iterator[tuple[str, str, str]]:
    """``(option as written, hyper-parameter name, raw value)`` of every ``--model.NAME[=]VALUE`` in ``argv``."""
    tokens = list(argv)
    for index, token in enumerate(tokens):
        if not token.startswith("--model."):
            continue
        option, equals, value = token.partition("=")
        if not equals:
            if index + 1 >= len(tokens) or tokens[index + 1].startswith("--"):
                continue  # no value: the parser has refused or will refuse it
            value = tokens[index + 1]
        name = option.removeprefix("--model.")
        name = name.removeprefix("init_args.").removeprefix("dict_kwargs.")
        if name.split(".")[0] in STRUCTURE:
            continue
        yield option, name, value


def refused_before_the_checkpoint(argv: Sequence[str], error: str) -> str | None:
    """With ``--ckpt_path``, a ``--model...`` option the parser refused (it knows only the domain's default
    model class until the run's config is read, e.g. a Diffusion option against the GAN default) as the
    message :func:`check_model_options_kept` gives: the model comes from the checkpoint, leave it out."""
    tokens = list(argv)
    if not any(t == "--ckpt_path" or t.startswith("--ckpt_path=") for t in tokens) or 'Parser key "model"' not in error:
        return None
    given = [option for option, _, _ in model_options(tokens)]
    named = [option for option in given if f"'{option.rsplit('.', 1)[-1]}'" in error]  # the option(s) the parser named
    given = named or given
    if not given:
        return None
    return (
        f"{', '.join(given)}: with --ckpt_path the model and its options come from the checkpoint, so a --model option cannot be "
        "given or changed here. Leave it out; options that apply when generating or predicting are data options (see --help), "
        "and a model with other options needs a new training run"
    )


def same_option_value(given: Any, saved: Any) -> bool:
    """Whether an option's value as parsed now equals the one a checkpoint saved: numbers by value, lists and
    tuples alike, mappings key by key (a YAML list is a tuple once saved).

    >>> same_option_value([1, {"a": (2, 3)}], (1.0, {"a": [2, 3]})), same_option_value({"a": 1}, {"a": 1, "b": 2})
    (True, False)
    """
    if isinstance(given, (int, float)) and isinstance(saved, (int, float)) and not isinstance(given, bool) and not isinstance(saved, bool):
        return float(given) == float(saved)
    if isinstance(given, (list, tuple)) and isinstance(saved, (list, tuple)):
        return len(given) == len(saved) and all(same_option_value(a, b) for a, b in zip(given, saved))
    if isinstance(given, Mapping) and isinstance(saved, Mapping):
        return given.keys() == saved.keys() and all(same_option_value(given[k], saved[k]) for k in given)
    return given == saved


def check_model_options_kept(argv: Sequence[str], hparams: Mapping[str, Any], label: str) -> None:
    """Refuse (``InputError``) a ``--model...`` option in ``argv`` whose value differs from the checkpoint's ``hparams``.

    Nested options (``--model.init_args.optimizer.lr``) are compared as a whole: refused when given at all
    unless equal. ``label`` names the checkpoint in the message (``--ckpt_path best``).
    """
    for option, name, raw in model_options(argv):
        top, _, rest = name.partition(".")
        if top not in hparams:
            continue  # not a saved hyper-parameter (a link target or unknown: the parser's business)
        try:
            given = yaml.safe_load(raw)
        except yaml.YAMLError:
            given = raw
        saved = hparams[top]
        if rest:
            node = saved
            for part in rest.split("."):
                node = node.get(part) if isinstance(node, Mapping) else None
            saved = node
        if same_option_value(given, saved):
            continue
        if name in LOOP_OPTIONS:
            raise InputError(f"{option} {raw}: with {label} {LOOP_OPTIONS[name].format(saved=saved)}")
        raise InputError(
            f"{option} {raw}: with {label} the model is built from the checkpoint's options ({name}: {saved!r} there), so this option "
            "would be ignored. Leave it out; options that apply when generating or predicting are data options (see --help), "
            "and a model with other options needs a new training run"
        )
