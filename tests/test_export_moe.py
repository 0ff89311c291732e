"""Issue "Every model leaves": MoE models convert between strategies, and every export comes back in."""

import shutil

import pytest
import torch
from test_export_remote import SHAPES, load, scalevec_model, tokens

from scalevec import apply_strategy
from scalevec.evaluate import load_model
from scalevec.export.remote import save_remote
from scalevec.hf_import import hf_model, import_hf, read_hf_dir

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("shape", ["moe", "moe-shared"])
@pytest.mark.parametrize("source, target", [("standard", "hg+or"), ("unified", "er"), ("hg+dp+er", "standard"),
                                            ("dnp", "hg+dp+or"), ("gemma", "hg")])
def test_apply_strategy_converts_moe_models_exactly(shape, source, target):
    """Router, per-expert and shared-expert scales go where the target holds them (one per expert under HG), DNP
    scales of every expert keep their values under OR/ER (one magnitude per expert)."""
    model = scalevec_model(shape, source)
    x = tokens()
    with torch.no_grad():
        before = model(x)
        apply_strategy(model, target)
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    assert model.strategy.heterogeneous == ("hg" in target)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_remote_export_imports_back_exactly_and_evaluates(tmp_path, small_data, shape):
    model = scalevec_model(shape, "unified")
    save_remote(model, tmp_path / "export")
    shutil.copyfile(small_data / "tokenizer.json", tmp_path / "export" / "tokenizer.json")
    x = tokens()
    with torch.no_grad():
        expected = model(x)
        back, form = hf_model(*read_hf_dir(tmp_path / "export"))
        assert form == "remote"
        torch.testing.assert_close(back(x), expected, atol=1e-5, rtol=1e-5)
        loaded, _ = load_model(tmp_path / "export")  # what scalevec eval and generate read
        torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=1e-5)
    (tmp_path / "export" / "tokenizer.json").unlink()  # a 512-token tokenizer: too many for this model to train
    difference = import_hf(tmp_path / "export", "unified", tmp_path / "run", warm_start=False, log=lambda *_: None)
    assert difference < 1e-4
    save_remote(back, tmp_path / "again")  # the round trip writes the same checkpoint's function
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "again")(x).logits, expected, atol=1e-4, rtol=1e-4)
