"""PEP 517 backend: setuptools, plus "build against the torch that is already installed".

A C++ extension must be compiled against the exact torch it will be imported into (the ABI and
the CUDA version have to match). With build isolation pip would otherwise fetch the newest torch
from the index into the build environment. This backend asks the outer interpreter (``python -I``
skips pip's isolation hooks) which torch it has and pins the build requirement to that version.
With no torch installed it falls back to an unpinned requirement.
"""

import subprocess
import sys

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (re-export the standard hooks)


def _installed_torch_requirement() -> str:
    probe = "import importlib.metadata as m; print(m.version('torch'))"
    try:
        version = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True,
                                 text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "torch"
    # "2.14.1+cu130" -> "torch==2.14.1": index wheels carry no local version tag.
    return f"torch=={version.split('+')[0]}"


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + [_installed_torch_requirement()]


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + [_installed_torch_requirement()]
