"""Ray Tune search-space domains as the sweep checks and shows them (gppf.launch.sweep, sweep_results)."""

from __future__ import annotations

from typing import Any

from gppf.config.base import ConfigError


def describe(domain: Any) -> str:
    """A domain as the job file wrote it: loguniform(0.01, 1), choice(['fpn', 'pre']), ..."""
    from ray.tune.search.sample import Categorical, Float, Integer, LogUniform

    if is_grid(domain):
        return f"grid_search({domain['grid_search']!r})"
    if isinstance(domain, (Float, Integer)):
        kind = "log" if isinstance(_base_sampler(domain), LogUniform) else ""
        name = "uniform" if isinstance(domain, Float) else "randint"
        return f"{kind}{name}({domain.lower}, {domain.upper})"
    if isinstance(domain, Categorical):
        return f"choice({domain.categories!r})"
    return repr(domain)


def is_log(domain: Any) -> bool:
    from ray.tune.search.sample import Domain, LogUniform

    return isinstance(domain, Domain) and isinstance(_base_sampler(domain), LogUniform)


def _base_sampler(domain: Any) -> Any:
    sampler = domain.get_sampler()
    return getattr(sampler, "sampler", sampler)  # Quantized wraps the real one


def is_grid(domain: Any) -> bool:
    return isinstance(domain, dict) and set(domain) == {"grid_search"}


def corners(key: str, domain: Any) -> list[Any]:
    """The values of a domain that bound it: a range's ends, every category, every grid value."""
    from ray.tune.search.sample import Categorical, Domain, Float, Function, Integer

    if is_grid(domain):
        values = list(domain["grid_search"])
    elif isinstance(domain, Float):
        values = [domain.lower, domain.upper]
    elif isinstance(domain, Integer):
        values = [domain.lower, domain.upper - 1]  # tune.randint's upper bound is exclusive
    elif isinstance(domain, Categorical):
        values = list(domain.categories)
    elif isinstance(domain, Function):
        return []  # tune.sample_from: nothing to enumerate; its values are checked when a trial starts
    elif isinstance(domain, Domain):
        raise ConfigError(f"search space entry {key!r}: unsupported domain {domain!r}")
    else:
        values = [domain]  # a constant
    if not values:
        raise ConfigError(f"search space entry {key!r}: {describe(domain)} has no values")
    return values
