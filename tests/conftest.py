"""Shared fixtures: the tiny offline model is built once per test session."""

import warnings

import pytest

warnings.filterwarnings("ignore", message=".*gemm_4bit.*")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from data.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory):
    from data.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny_chat") / "model", with_chat_template=True)
