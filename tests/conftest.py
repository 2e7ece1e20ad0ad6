"""Shared fixtures (the helpers they build on are in helpers.py)."""

import os
import shutil

import pytest
import torch
from helpers import TOKENIZER_FILES, small_config_dir, synthetic_batch, synthetic_spec, write_small_ml1m

from tabular2text.schema import FeatureSpec
from towers.language import default_model_dir

# A bug in ctrl-rec raises its traceback in tests; users see one `error:` line (test_bad_input checks both).
os.environ.setdefault("CTRL_DEBUG", "1")


@pytest.fixture
def spec() -> FeatureSpec:
    return synthetic_spec()


@pytest.fixture
def batch(spec) -> dict[str, torch.Tensor]:
    return synthetic_batch(spec)


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    """A random 2-block BERT of width 16 with the real all-MiniLM-L6-v2 tokenizer, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    for name in TOKENIZER_FILES:
        shutil.copy(default_model_dir() / name, folder / name)
    from transformers import BertConfig, BertModel  # only the tests that build a language tower pay for it

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, bert_dir):
    tmp = tmp_path_factory.mktemp("pipeline")
    data = write_small_ml1m(tmp / "ml-1m")
    configs = small_config_dir(tmp / "configs", bert_dir, tmp / "text-vectors")
    from ctrl.app.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CTRL_CACHE_DIR", str(tmp / "cache"))
        main(["run", "--config_dir", str(configs), "--data_dir", str(data), "--out", str(tmp / "out")])
    return tmp


@pytest.fixture(scope="module")
def one_thread():
    """For a module of tiny training runs (`pytestmark = pytest.mark.usefixtures("one_thread")`): tensors this small
    gain nothing from threads, which only wait on a busy machine (6x slower here). One count for the whole module: a
    rerun must see the same thread count to reproduce a run's numbers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
