"""Registers the ``longflow_hf`` model with lm-eval, with nothing for the user to do.

lm-eval 0.4.13 finds models only in its own registry (no plugin entry points), and it fills that
registry with its built-in models only while the registry is empty, when ``lm_eval.models`` is
first imported. So ``longflow_hf`` must be added right *after* that import: added earlier, the
registry would not be empty and ``hf`` and the other built-ins would never be registered.

``longflow_patch_lm_eval.pth`` (installed into site-packages next to the package) loads this
file at interpreter start-up *by path*, under its own name, so that start-up imports neither
``longflow_patch`` (torch, transformers) nor lm-eval; `install` puts a finder on
``sys.meta_path`` that waits for ``lm_eval.models`` and then registers a lazy entry (a
``"module:Class"`` string that lm-eval imports only when ``--model longflow_hf`` is asked for).
This covers ``lm_eval``, ``python -m lm_eval``, ``accelerate launch -m lm_eval`` and ``torchrun -m
lm_eval`` alike, since every one of their processes starts a fresh interpreter. Standard library
only; every failure is swallowed, so neither Python start-up nor lm-eval can be broken by it.
"""

import importlib.abc
import sys

MODEL_NAME = "longflow_hf"
MODEL_CLASS = "longflow_patch.eval.model:LongFlowLM"
WATCHED_MODULE = "lm_eval.models"


def register() -> None:
    """Add ``longflow_hf`` to lm-eval's model registry (call after ``lm_eval.models`` is imported)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_CLASS)


def install() -> None:
    """Register now if lm-eval's models are already loaded, else once they load."""
    try:
        if WATCHED_MODULE in sys.modules:
            register()
        elif not any(getattr(finder, "registers_longflow", False) for finder in sys.meta_path):
            sys.meta_path.insert(0, _RegisterAfterImport())
    except Exception:
        pass


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: lends the loader of ``lm_eval.models`` a `register` call after it runs."""

    registers_longflow = True

    def find_spec(self, fullname, path, target=None):
        if fullname != WATCHED_MODULE:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the search below from finding this finder
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader, then `register`; anything else is the real loader's."""

    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        try:
            register()
        except Exception:
            pass

    def __getattr__(self, name: str):
        return getattr(self._loader, name)
