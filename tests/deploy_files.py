"""Helpers for the multi-GPU tests: deploy/generate.py as a module, and Debian's haproxy."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def load_generator():
    """deploy/generate.py (a script, not a package module): what renders the shipped files."""
    spec = importlib.util.spec_from_file_location("jmoshi_deploy_generate", DEPLOY / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def haproxy_path() -> str:
    path = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if path is None:
        pytest.fail("haproxy is missing: run `bash scripts/setup-system.sh` (installs Debian's haproxy)")
    return path
