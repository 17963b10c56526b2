"""MH by prior regeneration: redraw a selection of latent sites from their prior conditionals.

Proposal ``q(x'_S | x) = Π_{s ∈ S} p(x'_s | parents)``; the acceptance ratio is the ratio of every
*other* site's density (observations included), :func:`ppinfer.traced.regenerate`'s weight.
:class:`Regenerate` moves one block ``S``; :class:`SingleSiteMH` sweeps over the latent sites one at
a time (a :func:`~ppinfer.mcmc.base.cycle`). Valid for any fixed-structure program, discrete or
continuous; checked exactly in ``semantics.mcmc``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ppinfer import checks
from ppinfer.errors import ConfigError, ModelError
from ppinfer.mcmc.base import Kernel, cycle, mh_kernel
from ppinfer.traced import regenerate

__all__ = ["Regenerate", "SingleSiteMH", "regenerate_kernel"]


@dataclass(frozen=True)
class Regenerate:
    """Block prior-regeneration MH over ``selection`` (site names)."""

    selection: Sequence[str]

    def __post_init__(self):
        selection = checks.site_names("Regenerate(selection)", self.selection)
        if not selection:
            raise ConfigError("Regenerate(selection): give a site name or a non-empty tuple of them")
        object.__setattr__(self, "selection", selection)

    def build(self, program: Callable[..., Any], num_warmup: int = 0, sites=None) -> Kernel:
        if sites is not None:
            _require_sites(self.selection, sites)
        return regenerate_kernel(program, self.selection)


@dataclass(frozen=True)
class SingleSiteMH:
    """One sweep of single-site prior regeneration over ``sites`` (default: every latent site, in
    program order)."""

    sites: Sequence[str] | None = None

    def __post_init__(self):
        if self.sites is not None:
            object.__setattr__(self, "sites", checks.site_names("SingleSiteMH(sites)", self.sites))

    def build(self, program: Callable[..., Any], num_warmup: int = 0, sites=None) -> Kernel:
        names = tuple(self.sites) if self.sites is not None else tuple(sites or ())
        if not names:
            raise ModelError("SingleSiteMH: the program has no latent site to move")
        if sites is not None:
            _require_sites(names, sites)
        return cycle(*(regenerate_kernel(program, (n,)) for n in names))


def regenerate_kernel(program: Callable[..., Any], selection: Sequence[str]) -> Kernel:
    """The MH :class:`~ppinfer.mcmc.Kernel` regenerating ``selection`` from the prior."""
    selection = tuple(selection)
    return mh_kernel(program, lambda key, trace, args: regenerate(key, program, args, trace, selection))


def _require_sites(names, sites) -> None:
    unknown = sorted(set(names) - set(sites))
    if unknown:
        raise ModelError(f"site(s) {unknown} are not latent sites of the program")
