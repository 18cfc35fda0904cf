import os

import pytest
import torch

# Two cores: keep each test process to one intra-op thread so pytest -n 2 does not oversubscribe.
torch.set_num_threads(int(os.environ.get("EARLYEXIT_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Timing varies on shared CI machines: property tests are about correctness, not speed. They run
# derandomized (the same examples on every run, whatever the machine), so a failure is reproducible and a
# pass is not luck; HYPOTHESIS_PROFILE=explore draws fresh examples locally.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", deadline=None, print_blob=True, derandomize=True)
settings.register_profile("explore", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
