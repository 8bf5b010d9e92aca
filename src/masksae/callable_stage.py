"""Make a stage package callable: ``masksae.harvest(...)`` runs :func:`masksae.api.harvest`.

``masksae.harvest``, ``masksae.train`` and ``masksae.evaluate`` are both stage packages and
the notebook API's functions. Python binds a package's attribute to its subpackage as soon
as the subpackage is imported, so a plain function of the same name would be shadowed; the
package module itself is made callable instead (its class becomes a ModuleType subclass
whose ``__call__`` forwards to ``masksae.api``), and either spelling works.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


class _CallableStage(types.ModuleType):
    """A stage package whose call runs the API function of the same name."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        api = importlib.import_module("masksae.api")
        return getattr(api, self.__name__.rsplit(".", 1)[-1])(*args, **kwargs)


def make_callable(module_name: str) -> None:
    """Turn the (already imported) package ``module_name`` into a callable stage."""
    sys.modules[module_name].__class__ = _CallableStage
