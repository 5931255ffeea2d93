import sys
from pathlib import Path

import pytest

from premoe import threads

threads.configure()  # as the CLI does, before torch loads: passive OpenMP waits, free cores only

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    """A saved tiny random Qwen3-MoE checkpoint (fp32 on disk for exact comparisons)."""
    return tiny.save("qwen3_moe", tmp_path_factory.mktemp("tiny") / "qwen3_moe")
