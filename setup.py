"""Build glue only (the project is described in pyproject.toml): ships ``longflow_patch_lm_eval.pth``
at the top of site-packages, from wheels and from editable installs alike.

The ``.pth`` line loads ``longflow_patch/eval/hook.py`` by path (Python start-up must not import
``longflow_patch``, which imports torch) and installs its import hook, which registers the
``longflow_hf`` model once lm-eval loads its models; see that module.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "longflow_patch_lm_eval.pth"
PTH_LINE = (  # one line; names chosen not to clash with site.addpackage's own locals
    "import importlib.util as u, os; "
    "s = u.find_spec('longflow_patch'); "
    "p = s and os.path.join(s.submodule_search_locations[0], 'eval', 'hook.py'); "
    "h = p and os.path.isfile(p) and u.spec_from_file_location('_longflow_patch_lm_eval_hook', p); "
    "m = h and u.module_from_spec(h); "
    "m and (h.loader.exec_module(m), m.install())\n"
)


class BuildPyWithPth(build_py):
    """``build_py`` that also writes the ``.pth`` file to the root of what gets installed.

    A wheel installs its build folder's root into site-packages. An editable (PEP 660) wheel maps
    the packages with a finder and ignores the build folder; its root is the ``install`` command's
    ``install_lib``, which setuptools points at the unpacked editable wheel.
    """

    def run(self) -> None:
        super().run()
        roots = [self.build_lib]
        if self.editable_mode:
            roots.append(self.get_finalized_command("install").install_lib)
        for root in roots:
            Path(root).mkdir(parents=True, exist_ok=True)
            Path(root, PTH_NAME).write_text(PTH_LINE, encoding="utf-8")

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib, PTH_NAME))]


setup(cmdclass={"build_py": BuildPyWithPth})
