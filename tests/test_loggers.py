"""W&B goes online only with credentials; everything else stays offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from fmlab.loggers import wandb_should_be_offline


@pytest.fixture
def no_wandb_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    return netrc


def test_offline_without_credentials_online_with_them(no_wandb_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert wandb_should_be_offline(None) is True
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_should_be_offline(None) is False
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_should_be_offline(None) is True
    assert wandb_should_be_offline(False) is False  # an explicit choice wins


def test_netrc_entry_from_wandb_login_counts_as_credentials(no_wandb_env: Path) -> None:
    no_wandb_env.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    no_wandb_env.chmod(0o600)
    assert wandb_should_be_offline(None) is False
    no_wandb_env.write_text("machine example.org\n  login user\n  password secret\n")
    assert wandb_should_be_offline(None) is True
