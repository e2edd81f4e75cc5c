"""An unreachable hub is one line at once, not a minute of retries (data/base/hub.py)."""

import time

import pytest

from twophase.data.base import hub
from twophase.data.base.errors import UserError


@pytest.fixture
def fresh_probe(monkeypatch):
    monkeypatch.setattr(hub, "_offline", None)
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)


def test_offline_variable_makes_a_missing_model_one_quick_line(fresh_probe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "_answers", lambda endpoint: pytest.fail("no probe when the variable says offline"))
    started = time.monotonic()
    with pytest.raises(UserError) as err:
        hub.load_tokenizer("no-such-org/no-such-model")
    assert time.monotonic() - started < 15
    assert str(err.value) == (
        "cannot load tokenizer 'no-such-org/no-such-model': the hub is not reachable (offline) and it is not in the "
        "local cache; pass a local path, or pre-download it where there is network (hf download "
        "no-such-org/no-such-model, then HF_HUB_OFFLINE=1 on the compute node; launch/README.md: 'Offline machines and compute nodes')")


def test_a_host_that_does_not_answer_means_offline(fresh_probe, monkeypatch):
    asked = []
    monkeypatch.setattr(hub, "_answers", lambda endpoint: asked.append(endpoint) or False)
    monkeypatch.setattr(hub, "_go_offline", lambda: None)
    assert hub.hub_offline() is True and hub.hub_offline() is True
    assert asked == ["https://huggingface.co"]  # asked once per process
