"""``python -m pipelines.registry DOMAIN COMMAND``: the model registry's command line.

Only the entry point; the command line is :mod:`pipelines.registry_cli`, the registry
:mod:`pipelines.model_registry`, the domain registry :mod:`pipelines.domain_registry`.
"""

from pipelines.registry_cli import main

if __name__ == "__main__":
    raise SystemExit(main())
