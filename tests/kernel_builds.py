"""The 4-bit kernel library built for another CPU than this one, for tests that compare or inspect builds."""

from __future__ import annotations

from pathlib import Path

from p2pinfer import kernels


def library_for(monkeypatch, march: str) -> Path:
    """The kernel library built for ``-march=march`` (``P2PINFER_KERNEL_MARCH`` set for the build only, through
    ``monkeypatch``); the test fails where it does not build."""
    monkeypatch.setenv("P2PINFER_KERNEL_MARCH", march)
    try:
        lib = kernels.library_path()
    finally:
        monkeypatch.delenv("P2PINFER_KERNEL_MARCH")
    assert lib is not None, f"the kernel should build for -march={march} (CI installs gcc)"
    return lib
