"""Each stage installs alone: mister_jax pulls in no torch, encoders_torch no jax, bridges neither (it
needs NumPy alone).

`mister_jax.import_torch` is the one module of mister_jax that reads torch's file format: it parses the
`.pth` archive itself, so importing it (part of the walk below) must load no torch either.
"""

import json
import subprocess
import sys

import pytest


def _modules_loaded_by(package: str) -> set[str]:
    """The top-level modules that importing every module of ``package`` loads, in a fresh interpreter."""
    code = (
        "import importlib, json, pkgutil, sys\n"
        "before = {m.split('.')[0] for m in sys.modules}\n"
        f"pkg = importlib.import_module({package!r})\n"
        "for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "    importlib.import_module(info.name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} - before)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("bridges", {"torch", "transformers", "peft", "jax", "flax", "optax", "orbax"}),
        ("mister_jax", {"torch", "transformers", "peft"}),
        ("encoders_torch", {"jax", "flax", "optax", "orbax"}),
    ],
)
def test_package_and_all_its_modules_import_without_the_other_stack(package, forbidden):
    loaded = _modules_loaded_by(package)
    assert not loaded & forbidden, f"{package} pulled in {sorted(loaded & forbidden)}"
    if package == "bridges":  # the store format's reader and writer: the standard library and NumPy
        assert {m for m in loaded if m not in sys.stdlib_module_names} == {"bridges", "numpy"}


def test_the_torch_checkpoint_importer_loads_no_torch():
    code = "import sys, mister_jax.import_torch; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
