"""Hugging Face transformers models and text calibration, offline: a BERT built from a small BertConfig with
random weights and a tokenizer made from a tiny vocabulary file, saved to a local directory."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import anybit
from anybit import ptq
from anybit.cli import main
from anybit.data import text_calibration
from anybit.evaluation import compare_outputs
from anybit.models import hf

transformers = pytest.importorskip("transformers")

WORDS = ("the a model runs on every precision weights and activations are quantized to four or eight bits "
         "calibration uses short english sentences while padding tokens never count in any range loss "
         "layer input output error small large real text data set held out test").split()
SENTENCES = [" ".join(WORDS[(7 * i + 3 * j) % len(WORDS)] for j in range(3 + (5 * i) % 11)) for i in range(96)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 2-layer BERT (hidden 32) with random weights and a word-level tokenizer, saved like any local model."""
    root = tmp_path_factory.mktemp("tiny-bert")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS))]) + "\n")
    tokenizer = transformers.BertTokenizer(str(vocab))
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    with torch.no_grad():   # a few large channels, as trained transformers have (activation outliers)
        model.embeddings.LayerNorm.weight[:2] *= 8
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def bert(model_dir):
    return hf.load_pretrained(model_dir)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return hf.load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def calib(tokenizer):
    return text_calibration(SENTENCES[:64], tokenizer)


@pytest.fixture(scope="module")
def held_out(tokenizer):
    return text_calibration(SENTENCES[64:], tokenizer)


def test_text_calibration_pads_and_masks(tokenizer, tmp_path):
    batch = text_calibration(["a model", "the model runs on every precision"], tokenizer)
    assert set(batch) >= {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"].sum(1).tolist()[0] < batch["attention_mask"].shape[1]   # the short one is padded
    path = tmp_path / "text.txt"
    path.write_text("a model\n\n  the model runs  \n")
    from_file = text_calibration(path, tokenizer)
    assert from_file["input_ids"].shape[0] == 2
    with pytest.raises(anybit.data.TextDataError, match="no text file"):
        text_calibration(tmp_path / "missing.txt", tokenizer)
    with pytest.raises(anybit.data.TextDataError, match="only 2"):
        text_calibration(path, tokenizer, num_samples=3)


def test_converted_bert_is_exactly_float_at_32_bits(bert, calib):
    with pytest.warns(UserWarning, match="Embedding"):   # embeddings stay float, and the warning says so
        model = anybit.convert(ptq.float_copy(bert), anybit.QuantSpec(weight="asymmetric", weight_per_channel=True),
                               example_input=calib)
    assert len(anybit.quant.quant_layers(model)) == 2 * 6 + 1
    with torch.no_grad():
        assert torch.equal(model(**calib).last_hidden_state, bert(**calib).last_hidden_state)


def test_first_and_last_layers_follow_execution_and_use(bert, calib):
    """q, k and v of the first block share its input; the pooler's output is not the compared hidden states."""
    q = ptq.ptq_convert(bert, 8, example=ptq.calibration_tensor(calib, 2))
    pinned = sorted(n for n, m in anybit.quant.quant_layers(q).items() if m.pinned)
    assert pinned == ["encoder.layer.0.attention.self.key", "encoder.layer.0.attention.self.query",
                      "encoder.layer.0.attention.self.value", "encoder.layer.1.output.dense"]


def test_padding_enters_no_range(bert, tokenizer):
    """The same sentences padded to their longest or to 48 positions give the same ranges."""
    short = text_calibration(SENTENCES[:32], tokenizer)
    padded = dict(tokenizer(SENTENCES[:32], padding="max_length", max_length=48, return_tensors="pt"))
    ranges = []
    for inputs in (short, padded):
        model = ptq.ptq_convert(bert, None)
        anybit.set_precision(model, 4)
        ranges.append(ptq.init_ranges(model, inputs, "minmax"))
    for name, entry in ranges[0].items():
        assert entry["act_range"] == pytest.approx(ranges[1][name]["act_range"], rel=1e-4), name


def test_calibrate_activations_takes_a_batch_encoding(bert, tokenizer):
    with pytest.warns(UserWarning, match="Embedding"):
        model = anybit.convert(ptq.float_copy(bert), anybit.QuantSpec(weight="asymmetric"))
    encoding = tokenizer(SENTENCES[:8], padding=True, return_tensors="pt")
    assert anybit.calibrate_activations(model, encoding) == 13
    anybit.set_precision(model, 8)
    with torch.no_grad():
        model(**encoding)


@pytest.mark.parametrize("w, a", [(8, 8), (4, 8)])
def test_calibration_from_strings_beats_round_to_nearest(bert, tokenizer, held_out, w, a):
    texts = SENTENCES[:64]
    errors = {}
    for pipeline in ("rtn", "adaquant"):
        qmodel, report = ptq.quantize(bert, text_calibration(texts, tokenizer), w, a, pipeline, iters=30,
                                      keep_first_last=None, quiet=True)
        assert report.output == "hidden"
        errors[pipeline] = compare_outputs(qmodel, bert, held_out)
    assert errors["adaquant"]["relative_error"] < errors["rtn"]["relative_error"]
    assert errors["adaquant"]["cosine"] > errors["rtn"]["cosine"] - 1e-4
    if w == 8:
        assert errors["adaquant"]["cosine"] > 0.99


def test_bn_free_pipeline_skips_bn_tuning_and_tunes_layernorm(bert, calib):
    assert any(n.endswith("LayerNorm.weight") for n in ptq.tuning.tunable_biases(bert))
    qmodel, report = ptq.quantize(bert, calib, 4, 8, "advanced", iters=5, bias_iters=5, quiet=True)
    stages = {s["name"]: s for s in report.stages}
    assert stages["bn_tuning"]["result"]["skipped"] and stages["bn_tuning"]["seconds"] < 0.05
    assert stages["bias_tuning"]["result"]["parameters"] > 0
    adaquant = stages["adaquant"]["result"]
    assert adaquant["caching"] == "stream" and adaquant["graph"] == "hooks"
    assert report.kl["final"] <= report.kl["init"]


def test_stream_and_pass_caching_give_the_same_result(bert, calib):
    models = []
    for caching in ("stream", "passes"):
        model = ptq.ptq_convert(bert, None)
        anybit.set_precision(model, (4, 8))
        ptq.init_ranges(model, calib, "mse")
        report = ptq.adaquant(model, calib, iters=4, float_model=bert, caching=caching, seed=1)
        assert report["caching"] == caching
        models.append((model, report))
    (m1, r1), (m2, r2) = models
    for name in r1["layers"]:
        assert r1["layers"][name]["mse_before"] == pytest.approx(r2["layers"][name]["mse_before"], rel=1e-4)
        expected = 64 if name == "pooler.dense" else int(calib["attention_mask"].sum())   # real tokens only
        assert r1["layers"][name]["rows"] == expected
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), k


def test_mixed_precision_over_linear_layers(bert, calib):
    from anybit import mixed

    model = ptq.ptq_convert(bert, 8, example=ptq.calibration_tensor(calib, 2))
    alloc = mixed.allocate_for_model(model, calib, 0.2, options=(4, 8), layer_setup=mixed.MinMaxSetup(calib),
                                     quiet=True)
    assert alloc.relative_cost <= 0.2 and set(alloc.counts()) <= {"W4A4", "W8A8", "4", "8"}
    qmodel, report = ptq.quantize(bert, calib, 4, 8, "light", bit_allocator=mixed.ptq_bit_allocator(
        0.2, options=(4, 8)), quiet=True)
    assert report.stages[1]["result"]["changed"]


def test_missing_model_directory_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(hf.HFModelNotFoundError, match="no model directory"):
        hf.load_pretrained(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(hf.HFModelNotFoundError, match="no weights"):
        hf.load_pretrained(tmp_path / "half")
    text = tmp_path / "calib.txt"
    text.write_text("a sentence\n")
    rc = main(["ptq", str(tmp_path / "nowhere"), "--calib-text", str(text), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "no model directory" in err and len(err.strip().splitlines()) == 1


def test_cli_quantizes_a_model_directory_from_text(model_dir, tmp_path, capsys):
    calib_file, test_file = tmp_path / "calib.txt", tmp_path / "test.txt"
    calib_file.write_text("\n".join(SENTENCES[:48]) + "\n")
    test_file.write_text("\n".join(SENTENCES[64:]) + "\n")
    out = tmp_path / "out"
    rc = main(["ptq", str(model_dir), "--calib-text", str(calib_file), "--test-text", str(test_file),
               "--pipeline", "adaquant", "--w-bits", "4", "--a-bits", "8", "--iters", "5", "--out", str(out),
               "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "embedding cosine to float (held-out)" in printed
    run = json.loads((out / "run.json").read_text())
    assert run["metrics"]["output"] == "hidden" and run["config"]["calib_size"] == 48
    loaded = anybit.load(out, model=transformers.AutoModel.from_pretrained(model_dir))
    rebuilt = anybit.load(out)   # the architecture from the sidecar, without the directory
    held = text_calibration(SENTENCES[64:], hf.load_tokenizer(model_dir))
    agreement = compare_outputs(loaded, hf.load_pretrained(model_dir), held)
    assert agreement["cosine"] == pytest.approx(run["metrics"]["agreement"]["cosine"], abs=1e-6)
    with torch.no_grad():
        assert torch.equal(loaded(**held).last_hidden_state, rebuilt(**held).last_hidden_state)
    assert anybit.get_precision(loaded)["encoder.layer.0.intermediate.dense"] == (4, 8)


def test_cli_text_flag_errors(model_dir, tmp_path, capsys):
    rc = main(["ptq", str(model_dir), "--out", str(tmp_path / "o1")])
    assert rc == 2 and "--calib-text" in capsys.readouterr().err
    rc = main(["ptq", str(model_dir), "--calib-text", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o2")])
    assert rc == 2 and "no text file" in capsys.readouterr().err


def test_plain_dict_models_are_not_mistaken_for_images():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, input_ids, attention_mask):
            return self.fc(input_ids.float().unsqueeze(-1).expand(-1, -1, 4) * attention_mask.unsqueeze(-1))

    batch = {"input_ids": torch.randint(0, 5, (6, 7)), "attention_mask": torch.ones(6, 7, dtype=torch.long)}
    qmodel, report = ptq.quantize(Net(), batch, 8, 8, "mse", keep_first_last=None, quiet=True)
    assert report.output == "logits"


def test_per_token_activations_need_no_calibration_and_survive_a_checkpoint(bert, calib, held_out, tmp_path):
    qmodel, report = ptq.quantize(bert, calib, 8, 8, "rtn", act_granularity="token", quiet=True)
    layer = qmodel.encoder.layer[0].intermediate.dense
    assert layer.input_quant.dynamic and not layer.input_quant.calibrated_bits()
    anybit.save(qmodel, tmp_path / "m")
    loaded = anybit.load(tmp_path / "m")   # rebuilt from the config the sidecar records
    with torch.no_grad():
        assert torch.equal(loaded(**held_out).last_hidden_state, qmodel(**held_out).last_hidden_state)
    errors = {g: compare_outputs(ptq.quantize(bert, calib, 8, 4, "rtn", act_granularity=g, quiet=True)[0], bert,
                                 held_out)["relative_error"] for g in ("tensor", "token")}
    assert errors["token"] < errors["tensor"]


def test_smoothing_moves_outliers_into_the_weights_without_changing_the_float_product(bert, calib, held_out):
    model = ptq.ptq_convert(bert, None)
    anybit.set_precision(model, (16, 16))
    ptq.init_ranges(model, calib, "minmax")
    with torch.no_grad():
        plain = model(**held_out).last_hidden_state
    spread = ptq.smooth(model, calib, 0.5)
    assert max(spread.values()) > 2   # the outlier channels of the embeddings' LayerNorm
    ptq.init_ranges(model, calib, "minmax")
    with torch.no_grad():
        smoothed = model(**held_out).last_hidden_state
    assert torch.allclose(plain, smoothed, atol=2e-3)   # x/s times W*s: the same product at 16 bits
    errors = {}
    for alpha in (None, 0.5):
        qmodel, _ = ptq.quantize(bert, calib, 8, 4, "mse", smooth_alpha=alpha, act_granularity="tensor",
                                 keep_first_last=None, quiet=True)
        errors[alpha] = compare_outputs(qmodel, bert, held_out)["relative_error"]
    assert errors[0.5] < errors[None]


def test_cli_budget_allocates_bits_over_the_linear_layers_and_eval_refuses_text_checkpoints(model_dir, tmp_path,
                                                                                            capsys):
    calib_file = tmp_path / "calib.txt"
    calib_file.write_text("\n".join(SENTENCES[:32]) + "\n")
    out = tmp_path / "mixed"
    rc = main(["ptq", str(model_dir), "--calib-text", str(calib_file), "--pipeline", "light", "--budget", "0.2",
               "--bit-options", "4,8", "--out", str(out), "--quiet"])
    assert rc == 0
    precision = json.loads((out / "run.json").read_text())["metrics"]["precision"]
    assert {tuple(p) for p in precision.values()} <= {(4, 4), (8, 8)} and len(precision) == 13
    capsys.readouterr()
    assert main(["eval", str(out), "--quiet"]) == 2
    assert "Hugging Face transformers checkpoint" in capsys.readouterr().err
