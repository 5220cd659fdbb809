import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session", params=["tiny-llama", "tiny-qwen2"])
def tiny(request):
    from sol.models import load

    model, tok = load(request.param)
    return model


@pytest.fixture(scope="session")
def tiny_llama():
    from sol.models import load

    return load("tiny-llama")[0]
