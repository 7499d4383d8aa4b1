"""Method registry: canonical names, aliases, config classes.

Every "valid choices" list in an error message is read from here, so a method added with
`register_method` shows up in all of them.
"""

from __future__ import annotations

from typing import Any

# canonical name -> config class
_METHODS: dict[str, type] = {}
# normalised key -> canonical name
_ALIASES: dict[str, str] = {}


def normalize_key(name: str) -> str:
    """Case-, dash- and underscore-insensitive lookup key: "Auto-Round" -> "autoround"."""
    return name.strip().lower().replace("-", "").replace("_", "")


def register_method(name: str, aliases: tuple[str, ...] = ()):
    """Class decorator: register a config class under its canonical `name` and `aliases`."""

    def wrap(cls: type) -> type:
        cls.method = name
        _METHODS[name] = cls
        for alias in (name, *aliases):
            _ALIASES[normalize_key(alias)] = name
        return cls

    return wrap


def method_names() -> list[str]:
    return sorted(_METHODS)


def canonical_method(name: Any) -> str:
    """Resolve a user-given method name (any case, dashes or underscores) to its canonical name."""
    if not isinstance(name, str):
        raise ValueError(
            f"quantization method must be a string, got {type(name).__name__}; "
            f"valid methods: {', '.join(method_names())}"
        )
    canonical = _ALIASES.get(normalize_key(name))
    if canonical is None:
        raise ValueError(f"unknown quantization method {name!r}; valid methods: {', '.join(method_names())}")
    return canonical


def config_class(name: str) -> type:
    return _METHODS[canonical_method(name)]
