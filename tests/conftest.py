"""Shared test set-up: run offline, import the repo's modules, and offer tiny models and tokenizers."""

import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tests never touch the network: Hugging Face libraries read these at import time, so set them first.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# The GPT-2 BPE rank file for tiktoken, where this workspace keeps one (there is no internet to download it).
_tiktoken_dir = os.path.join(os.path.dirname(REPO_ROOT), "shared", "tiktoken")
if os.path.isdir(_tiktoken_dir) and "TIKTOKEN_CACHE_DIR" not in os.environ:
    os.environ["TIKTOKEN_CACHE_DIR"] = _tiktoken_dir

# Tokenised datasets are cached on disk (data.cached_encode): the tests use a fresh folder of their own.
if "NANOPO_CACHE" not in os.environ:
    import tempfile
    os.environ["NANOPO_CACHE"] = tempfile.mkdtemp(prefix="nanopo-test-cache-")

if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

from data import Tokenizer  # noqa: E402
from configurator import UserError  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

# The models here are tiny: one thread avoids thread start-up costs and contention on a small shared machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def repo_root():
    return REPO_ROOT


@pytest.fixture(scope="session")
def byte_tok():
    return Tokenizer("byte")


@pytest.fixture(scope="session")
def gpt2_tok():
    """GPT-2's BPE, or a skip: offline, tiktoken needs its rank file (TIKTOKEN_CACHE_DIR), which a clone with no
    network and no ../shared/tiktoken does not have."""
    try:
        return Tokenizer("gpt2")
    except UserError as e:
        pytest.skip(f"no GPT-2 BPE rank file offline: {e}")


@pytest.fixture
def tiny_config():
    """A GPT small enough to run anything in milliseconds, with the byte tokenizer's vocabulary."""
    return GPTConfig(block_size=32, vocab_size=258, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)


@pytest.fixture
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return GPT(tiny_config).eval()


@pytest.fixture(scope="session")
def script_env():
    """Environment for running the repo's scripts: this one (offline settings included), one thread each."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env

