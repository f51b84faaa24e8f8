import warnings

import pytest

import mtpnb
from mtpnb.fixtures import make_checkpoint


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Folder factory: one random checkpoint per set of options, written once per session."""
    made = {}

    def get(**options):
        key = tuple(sorted(options.items()))
        if key not in made:
            made[key] = make_checkpoint(tmp_path_factory.mktemp("ckpt"), **options)
        return made[key]

    return get


@pytest.fixture(scope="session")
def hybrid_model(checkpoints):
    return mtpnb.load(checkpoints(family="qwen3_5"))


@pytest.fixture(scope="session")
def attention_model(checkpoints):
    return mtpnb.load(checkpoints(family="qwen3"))


def load_quietly(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mtpnb.load(path, **kw)
