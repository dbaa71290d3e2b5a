"""Domain packages. Each registers a :class:`pipelines.domain_registry.DomainSpec` in ``pyproject.toml``."""
