"""The CLI's failure paths: a message that names what happened, an exit status, no stack trace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tsugiki import demo
from tsugiki.cli import main


def test_a_failed_demo_stage_is_a_message_and_exit_status_1(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    def refresh_fails(args: Any) -> dict[str, Any]:
        raise demo.DemoFailed("the refresh ended failed: {'error': 'ImportError: ...'}")

    monkeypatch.setattr(demo, "run", refresh_fails)
    assert main(["demo", "--quick", "--home", str(tmp_path / "home")]) == 1
    err = capsys.readouterr().err
    assert "tsugiki demo: failed: the refresh ended failed" in err and "Traceback" not in err
    assert str(tmp_path / "home" / "summary.json") in err
