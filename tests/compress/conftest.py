"""compress tests never read the shared data folder: point it at an empty place."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_shared_data(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDFORGE_DATA", str(tmp_path / "no-shared-data"))
