"""Shared pytest fixtures. Area-specific helpers live in tests/helpers/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REF_FIXTURE = Path(
    os.environ.get("EDGEPIPE_REF_FIXTURE", REPO.parent / "shared" / "fixtures" / "yolov5s-v5.0-ch1-ref.pt")
)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def ref_fixture_path() -> Path:
    """The reference outputs of the default model; a missing file is a failure, not a skip."""
    if not REF_FIXTURE.is_file():
        pytest.fail(f"reference fixture not found at {REF_FIXTURE} (set EDGEPIPE_REF_FIXTURE)")
    return REF_FIXTURE
