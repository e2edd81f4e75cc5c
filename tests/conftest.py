"""Shared fixtures: the tiny offline model is built once per test session."""

import os
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*gemm_4bit.*")

# The tests run tiny models whose matrices are too small for a second thread to pay for its
# synchronisation; one thread was measured faster on 2 cores (launch/README.md: "Timings on the CPU").
# TWOPHASE_TEST_THREADS=N measures another count.
torch.set_num_threads(int(os.environ.get("TWOPHASE_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from twophase.data.base.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory):
    from twophase.data.base.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny_chat") / "model", with_chat_template=True)
