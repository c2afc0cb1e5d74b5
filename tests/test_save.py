"""Save a converted model (safetensors) and load it back: same outputs, same structure."""
import pytest
import torch

import moefx
from moefx.checkpoint import load_pretrained, save_pretrained
from tests.conftest import PlainFFN


def test_tuned_plain_module_round_trips(tmp_path):
    torch.manual_seed(0)
    dense = PlainFFN().eval()
    calibration = [torch.randn(64, 16) for _ in range(3)]
    moe = moefx.convert(dense, 8, 2, calibration, method="coactivation", num_shared=1, router="representative", refit=True,
                        progress=False)
    save_pretrained(moe, str(tmp_path))
    loaded = load_pretrained(str(tmp_path), model=PlainFFN())
    x = torch.randn(32, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), moe(x))


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=100)
    batch = {"input_ids": torch.randint(0, 100, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    return transformers.BertModel(config).eval(), batch


def test_transformers_model_round_trips_from_its_config(tmp_path):
    dense, batch = _tiny_bert()
    moe = moefx.convert(dense, 4, 2, [batch], method="split", refit=True,
                        progress=False)
    save_pretrained(moe, str(tmp_path))
    loaded = load_pretrained(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, moe(**batch).last_hidden_state)


@pytest.mark.parametrize("options", [
    dict(method="upcycle", granularity=2),
    dict(method="upcycle", num_zero=1, num_const=1),
    dict(method="coactivation", router="least_squares", num_zero=1),
    dict(method="split", router="least_squares", pregate="block"),
], ids=["upcycle-granular", "upcycle-zero", "carved-zero", "pregate"])
def test_every_recipe_option_round_trips(tmp_path, options):
    dense, batch = _tiny_bert()
    moe = moefx.convert(dense, 4, 2, [batch], progress=False, **options)
    with torch.no_grad():  # distinct experts, so that a layer rebuilt with other routing would show
        for name, param in moe.named_parameters():
            if ".w_" in name or "router" in name:
                param.add_(torch.randn_like(param) * 0.05)
    save_pretrained(moe, str(tmp_path))
    loaded = load_pretrained(str(tmp_path))
    fresh = {"input_ids": torch.randint(0, 100, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    with torch.no_grad():
        assert torch.equal(loaded(**fresh).last_hidden_state, moe(**fresh).last_hidden_state)


def test_saving_needs_a_converted_model(tmp_path):
    with pytest.raises(ValueError, match="save the model that moefx.convert returned"):
        save_pretrained(PlainFFN(), str(tmp_path))


def test_moefx_layout_is_not_loadable_as_the_dense_architecture(tmp_path):
    transformers = pytest.importorskip("transformers")
    dense, batch = _tiny_bert()
    save_pretrained(moefx.convert(dense, 4, 4, [batch], progress=False), str(tmp_path))
    with pytest.raises(OSError):  # no model.safetensors: transformers refuses instead of loading random FFNs
        transformers.AutoModel.from_pretrained(str(tmp_path))


def test_fp16_checkpoint_reloads_as_fp16(tmp_path):
    dense, batch = _tiny_bert()
    moe = moefx.convert(dense.half(), 4, 4, [batch], progress=False)
    save_pretrained(moe, str(tmp_path))
    loaded = load_pretrained(str(tmp_path))
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, moe(**batch).last_hidden_state)


def test_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(0)
    first = moefx.convert(PlainFFN().eval(), 8, 2, [torch.randn(16, 16)], progress=False)
    save_pretrained(first, str(tmp_path))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    second = moefx.convert(PlainFFN().eval(), 8, 2, [torch.randn(16, 16)], progress=False)

    def fail(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr("moefx.checkpoint.json.dump", fail)  # fails after the weights are written
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(second, str(tmp_path))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_saving_into_the_dense_models_directory_removes_or_replaces_nothing_of_it(tmp_path):
    dense, batch = _tiny_bert()
    dense.save_pretrained(str(tmp_path), max_shard_size="50KB")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert "model.safetensors.index.json" in before
    moe = moefx.convert(dense, 4, 4, [batch], progress=False)
    with pytest.raises(ValueError, match="config.json, which moefx did not write .* save into another directory"):
        save_pretrained(moe, str(tmp_path))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_second_save_removes_only_what_the_first_save_wrote(tmp_path):
    torch.manual_seed(0)
    moe = moefx.convert(PlainFFN().eval(), 8, 2, [torch.randn(16, 16)], progress=False)
    (tmp_path / "model.safetensors").write_bytes(b"not moefx's")
    (tmp_path / "notes.txt").write_text("mine")
    save_pretrained(moe, str(tmp_path))
    (tmp_path / "moefx_model-00001-of-00002.safetensors").write_bytes(b"")  # a user's file under a moefx-like name
    save_pretrained(moe, str(tmp_path))
    assert (tmp_path / "model.safetensors").read_bytes() == b"not moefx's" and (tmp_path / "notes.txt").exists()
    assert (tmp_path / "moefx_model-00001-of-00002.safetensors").exists()


def test_broken_checkpoints_are_refused_naming_the_file(tmp_path):
    """A missing or truncated weights file, and an edited moefx.json, are named with the fix (not a legacy
    file name, a bare safetensors error, or KeyError: '0')."""
    import json
    import os
    import shutil

    torch.manual_seed(0)
    moe = moefx.convert(PlainFFN().eval(), 4, 2, [{"x": torch.randn(8, 16)}], progress=False)
    save_pretrained(moe, str(tmp_path / "saved"))

    def broken(name, change):
        path = tmp_path / name
        shutil.copytree(tmp_path / "saved", path)
        change(path)
        return str(path)

    path = broken("missing", lambda p: os.remove(p / "moefx_model.safetensors"))
    with pytest.raises(ValueError, match="missing has no weights: moefx_model.safetensors is not there") as error:
        load_pretrained(path, model=PlainFFN())
    assert "model.safetensors" not in str(error.value).replace("moefx_model.safetensors", "")
    cut = lambda p: (p / "moefx_model.safetensors").write_bytes((p / "moefx_model.safetensors").read_bytes()[:-64])
    path = broken("truncated", cut)
    with pytest.raises(ValueError, match="truncated/moefx_model.safetensors is truncated or not a safetensors file"):
        load_pretrained(path, model=PlainFFN())

    def edit(p):
        meta = json.loads((p / "moefx.json").read_text())
        (p / "moefx.json").write_text(json.dumps(dict(meta, example_kind="tuple")))

    with pytest.raises(ValueError, match=r"edited/moefx.json: example_kind 'tuple' does not match the stored example "
                                         r"\(\['x'\]\)"):
        load_pretrained(broken("edited", edit), model=PlainFFN())
