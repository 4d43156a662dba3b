"""Scenario plugins discovered through the ``mmscene.scenarios`` entry point group."""

from __future__ import annotations

import logging
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from mmscene.scenario import Scenario

GROUP = "mmscene.scenarios"
log = logging.getLogger(__name__)


@cache
def _entry_points() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=GROUP):
        if ep.name in found and found[ep.name].value != ep.value:
            raise RuntimeError(
                f"two plugins register scenario {ep.name!r}: {found[ep.name].value} and {ep.value}; uninstall one"
            )
        found[ep.name] = ep
    return found


def refresh() -> None:
    """Forget the cached entry points (after installing a plugin in a running process)."""
    _entry_points.cache_clear()


def available() -> dict[str, EntryPoint]:
    return dict(sorted(_entry_points().items()))


def scenario_class(name: str) -> type[Scenario]:
    eps = _entry_points()
    if name not in eps:
        known = ", ".join(sorted(eps)) or "none"
        raise ValueError(f"no installed plugin provides scenario {name!r} (installed: {known})")
    cls = eps[name].load()
    if not (isinstance(cls, type) and issubclass(cls, Scenario)):
        raise TypeError(
            f"entry point {eps[name].value} for scenario {name!r} is not a mmscene.Scenario subclass"
        )
    return cls


def get_scenario(name: str, **options: Any) -> Scenario:
    cls = scenario_class(name)
    try:
        return cls(**options)
    except TypeError as err:
        raise ValueError(f"bad options for scenario {name!r}: {err}") from err
