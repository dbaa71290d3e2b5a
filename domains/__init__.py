"""Domain packages. Each registers a :class:`pipelines.registry.DomainSpec` in ``pyproject.toml``."""
