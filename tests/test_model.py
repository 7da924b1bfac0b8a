"""The dual encoder: shapes, normalisation, offline rebuild, pretrained loading, freezing."""

import pytest
import torch
from transformers import BertConfig, BertModel, ResNetConfig, ResNetModel

from msd_core import model as model_module
from msd_core.config import get_preset
from msd_core.model import DualEncoder, build_model, freeze_text_layers, train_wordpiece_tokenizer

REPORTS = ["The heart is enlarged.", "No pleural effusion.", "Small left pneumothorax.", "Lungs are clear."]


def smoke_model():
    torch.manual_seed(0)
    return build_model(get_preset("smoke"), tokenizer_texts=REPORTS * 5)


def test_embeddings_are_unit_length():
    model = smoke_model()
    tokens = model.tokenize(REPORTS)
    pixels = torch.randn(4, model.spec.image_channels, model.spec.image_size, model.spec.image_size)

    images, texts = model(pixels, tokens["input_ids"], tokens["attention_mask"])

    assert images.shape == (4, model.spec.embed_dim)
    assert texts.shape == (4, model.spec.embed_dim)
    assert torch.allclose(images.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(texts.norm(dim=-1), torch.ones(4), atol=1e-5)


def test_rebuild_from_spec_matches():
    model = smoke_model().eval()
    rebuilt = DualEncoder.from_spec(model.spec).eval()
    rebuilt.load_state_dict(model.state_dict())
    tokens = model.tokenize(REPORTS)

    assert torch.equal(rebuilt.tokenize(REPORTS)["input_ids"], tokens["input_ids"])
    with torch.no_grad():
        assert torch.equal(rebuilt.encode_text(**tokens), model.encode_text(**tokens))


def test_wordpiece_vocabulary_is_repeatable():
    texts = [f"{side} {size} effusion case{i % 37}" for i, (side, size) in
             enumerate(zip(["left", "right", "bilateral"] * 50, ["small", "large", "moderate", "tiny", "mild"] * 30))]

    vocabularies = [train_wordpiece_tokenizer(texts, 80).get_vocab() for _ in range(4)]

    assert all(vocabulary == vocabularies[0] for vocabulary in vocabularies)
    assert len(vocabularies[0]) == 80


def test_rare_words_are_spelled_out():
    tokenizer = train_wordpiece_tokenizer(["left effusion"] * 3, 40)

    assert tokenizer.tokenize("left") == ["left"]
    assert tokenizer.tokenize("noise") == ["n", "##o", "##i", "##s", "##e"]


def test_minilm_loads_offline_with_checksum():
    model = build_model(get_preset("cpu-demo"))

    assert model.text_encoder.config.hidden_size == 384
    assert model.tokenizer.tokenize("cardiomegaly")[0] != "[UNK]"


def test_minilm_checksum_mismatch_rejected(monkeypatch):
    monkeypatch.setattr(model_module, "MINILM_SHA256", "0" * 64)

    with pytest.raises(ValueError, match="SHA-256 .* does not match"):
        model_module.minilm_path()


def test_cpu_demo_freezes_text_trunk():
    model = build_model(get_preset("cpu-demo"))
    layers = model.text_encoder.encoder.layer

    assert not any(p.requires_grad for p in model.text_encoder.embeddings.parameters())
    assert not any(p.requires_grad for layer in layers[:4] for p in layer.parameters())
    assert all(p.requires_grad for layer in layers[4:] for p in layer.parameters())
    assert all(p.requires_grad for p in model.image_encoder.parameters())


def test_freezing_needs_bert_like_tower():
    model = smoke_model()
    model.text_encoder = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="BERT-like text model"):
        freeze_text_layers(model, 1)


def test_pretrained_folders_load(tmp_path):
    tokenizer = train_wordpiece_tokenizer(REPORTS * 3, 80)
    text_folder, image_folder = tmp_path / "text", tmp_path / "image"
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(text_folder)
    tokenizer.save_pretrained(text_folder)
    ResNetModel(ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                             layer_type="basic")).save_pretrained(image_folder)
    config = get_preset("smoke", image_model=str(image_folder), text_model=str(text_folder), image_model_kwargs={},
                        text_model_kwargs={})

    model = build_model(config)

    assert model.spec.image_channels == 3
    assert model.spec.image_mean == (0.485, 0.456, 0.406)
    tokens = model.tokenize(REPORTS)
    pixels = torch.randn(4, 3, config.image_size, config.image_size)
    images, texts = model(pixels, tokens["input_ids"], tokens["attention_mask"])
    assert images.shape == texts.shape == (4, config.embed_dim)


def test_paper_presets_name_hub_models():
    for name in ("colab-t4", "paper"):
        config = get_preset(name)
        assert config.image_model == "microsoft/resnet-50"
        assert config.text_model == "emilyalsentzer/Bio_ClinicalBERT"
