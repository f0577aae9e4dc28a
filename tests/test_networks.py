"""AlignerVLM: shapes, attention, prompt tokenization and caching, local/missing encoders, presets (all offline)."""

import io
import socket

import pytest
import torch
from transformers import BertConfig, BertModel, ViTConfig, ViTModel

from bundle.networks import (
    DEMO_PRESET,
    AlignerVLM,
    build_aligner_vlm,
    upsample_attention,
)
from bundle.text import (
    SPECIAL_TOKENS,
    TextEncoderNotFoundError,
    build_prompt_tokenizer,
    build_text_encoder,
    tokenize_prompts,
)

# A tiny configuration for the tests that do not need the demo sizes.
TINY = dict(
    image_size=32,
    patch_size=8,
    vit_hidden=32,
    vit_layers=1,
    vit_heads=2,
    vit_mlp=64,
    text_hidden=32,
    text_layers=1,
    text_heads=2,
    text_intermediate=64,
    fusion_dim=32,
    fusion_heads=4,
    fusion_ffn=64,
)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Offline mode, and any socket connection attempt is recorded and refused."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    try:
        import huggingface_hub.constants as hf_constants

        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    except (ImportError, AttributeError):
        pass
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network access attempted in a test: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    yield attempts
    assert attempts == [], f"the code tried to reach the network: {attempts}"


@pytest.fixture(scope="module")
def demo_net():
    torch.manual_seed(0)
    return build_aligner_vlm("demo")


def test_demo_preset_shapes_and_attention(demo_net):
    x = torch.randn(2, 1, 128, 128)
    demo_net.train()  # dropout on: the returned attention must still be a distribution over patches
    out = demo_net(x)
    assert set(out) == {"logits", "attn", "attn_refined"}
    assert out["logits"].shape == (2, 3)
    assert out["attn"].shape == (2, 3, 8, 8) and out["attn_refined"].shape == (2, 3, 8, 8)
    sums = out["attn"].sum(dim=(-2, -1))
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
    assert bool((out["attn"] >= 0).all())
    # max_norm aligner (default): P in [0, 1] with its maximum exactly 1 in every map
    p = out["attn_refined"]
    assert bool((p >= 0).all()) and bool((p <= 1).all())
    assert torch.allclose(p.amax(dim=(-2, -1)), torch.ones(2, 3))
    # per-class queries differ, so per-class maps differ
    assert not torch.allclose(out["attn"][:, 0], out["attn"][:, 1])
    side = DEMO_PRESET["image_size"] // DEMO_PRESET["patch_size"]  # the preset's native grid (inputs may differ)
    assert demo_net.grid == (side, side) and demo_net.classes == ("nodule_mass", "pleural_effusion", "edema")
    assert demo_net.image_encoder.config.hidden_size == DEMO_PRESET["vit_hidden"]


def test_frozen_text_encoder_is_cached_and_gets_no_grad(demo_net, monkeypatch):
    assert all(not p.requires_grad for p in demo_net.text_encoder.parameters())
    demo_net.train()
    assert not demo_net.text_encoder.training  # stays in eval mode (no dropout) when frozen
    cached = demo_net.prompt_cache.clone()
    assert cached.shape == (3, demo_net.text_encoder.config.hidden_size)

    def boom(*a, **k):
        raise AssertionError("the frozen text encoder must not run in forward: its embeddings are cached")

    monkeypatch.setattr(demo_net.text_encoder, "forward", boom)
    out = demo_net(torch.randn(2, 1, 128, 128))
    (out["logits"].sum() + out["attn_refined"].sum()).backward()
    monkeypatch.undo()
    assert all(p.grad is None for p in demo_net.text_encoder.parameters())
    assert demo_net.text_proj[0].weight.grad is not None  # the projection MLP trains
    assert demo_net.image_encoder.embeddings.patch_embeddings.projection.weight.grad is not None
    demo_net.zero_grad(set_to_none=True)
    # the cache is the encoder's output for the prompts
    demo_net.refresh_prompt_cache()
    assert torch.allclose(demo_net.prompt_cache, cached)


def test_trainable_text_encoder_gets_gradients():
    torch.manual_seed(0)
    net = AlignerVLM(freeze_text=False, text_pooling="pooler", **TINY)
    out = net(torch.randn(2, 1, 32, 32))
    out["logits"].sum().backward()
    grads = [p.grad for p in net.text_encoder.parameters()]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)


def test_prompts_tokenize_without_unk():
    prompts = ["nodule or mass", "pleural effusion", "edema", "Cardiomegaly, enlarged heart!", "Opacité 2"]
    tok = build_prompt_tokenizer(prompts)
    vocab = tok.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))  # [PAD] = 0 ...
    ids, mask = tokenize_prompts(tok, prompts)
    assert not bool((ids == tok.unk_token_id).any())
    assert tok.tokenize("pleural effusion") == ["pleural", "effusion"]  # prompt words are whole tokens
    assert ids[:, 0].eq(tok.cls_token_id).all() and mask.sum(1).min() >= 3
    # words outside the prompts still tokenize (character pieces), never to [UNK]
    assert tok.unk_token not in tok.tokenize("pneumothorax 42")
    # a vocabulary that lacks the words is reported
    small = build_prompt_tokenizer(["edema"])
    small_vocab = {t: i for i, t in enumerate(list(SPECIAL_TOKENS) + ["edema"])}
    from transformers import BertTokenizer

    with pytest.raises(ValueError, match="UNK"):
        tokenize_prompts(BertTokenizer(vocab=small_vocab), ["pleural effusion"])
    assert small.tokenize("edema") == ["edema"]


@pytest.mark.parametrize("aligner", ["max_norm", "conv", "sigmoid"])
def test_aligners_output_in_unit_interval(aligner):
    torch.manual_seed(1)
    net = AlignerVLM(aligner=aligner, **TINY)
    out = net(torch.randn(3, 1, 32, 32))
    p, m = out["attn_refined"], out["attn"]
    assert p.shape == m.shape == (3, 3, 4, 4)
    assert bool((p >= 0).all()) and bool((p <= 1).all())
    if aligner == "conv":  # identity at initialisation: min-max normalised attention
        lo, hi = m.amin((-2, -1), keepdim=True), m.amax((-2, -1), keepdim=True)
        assert torch.allclose(p, (m - lo) / (hi - lo), atol=1e-5)
    p.sum().backward()
    assert net.image_encoder.embeddings.patch_embeddings.projection.weight.grad is not None


def _save_tiny_bert(path, prompts):
    tok = build_prompt_tokenizer(prompts)
    torch.manual_seed(3)
    cfg = BertConfig(
        vocab_size=len(tok.get_vocab()),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    model = BertModel(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def test_text_encoder_from_local_directory(tmp_path):
    prompts = ["nodule or mass", "pleural effusion", "edema"]
    saved = _save_tiny_bert(tmp_path / "bert", prompts).eval()
    net = AlignerVLM(text_encoder=str(tmp_path / "bert"), **TINY)
    assert net.text_source == str(tmp_path / "bert")
    ids, mask = tokenize_prompts(net.tokenizer, prompts)
    with torch.no_grad():
        expected = saved(input_ids=ids, attention_mask=mask).pooler_output
    assert torch.allclose(net.prompt_cache, expected, atol=1e-6)
    assert net(torch.randn(1, 1, 32, 32))["logits"].shape == (1, 3)


def test_missing_text_encoder_raises_helpful_error(tmp_path):
    with pytest.raises(TextEncoderNotFoundError, match="does not exist") as e:
        build_text_encoder(str(tmp_path / "nowhere"), ["edema"])
    assert "save_pretrained" in str(e.value) and "random-small" in str(e.value)
    with pytest.raises(TextEncoderNotFoundError, match="hf download no-such-org/no-such-bert-xyz") as e:
        AlignerVLM(text_encoder="no-such-org/no-such-bert-xyz", **TINY)
    assert "HF_HUB_CACHE" in str(e.value)
    # with a fallback the model builds, and says what it built
    tok, model, source = build_text_encoder("no-such-org/no-such-bert-xyz", ["edema"], fallback="random-small")
    assert source.startswith("random-small") and "fallback" in source
    with pytest.raises(ValueError, match="random-small"):
        build_text_encoder("random-huge", ["edema"])


def test_pretrained_vit_from_local_directory_rgb_to_grey(tmp_path):
    """An RGB ViT saved with save_pretrained loads offline; its patch kernel is summed over colours, which equals
    feeding the grey image repeated into 3 channels. A different image size interpolates the position embeddings."""
    torch.manual_seed(4)
    rgb = ViTModel(
        ViTConfig(
            image_size=32,
            patch_size=8,
            num_channels=3,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        ),
        add_pooling_layer=False,
    ).eval()
    rgb.save_pretrained(tmp_path / "vit")
    net = AlignerVLM(vit_pretrained=str(tmp_path / "vit"), **{**TINY, "vit_hidden": 999}).eval()
    assert net.image_encoder.config.hidden_size == 32 and net.in_channels == 1
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        ref = rgb(pixel_values=x.repeat(1, 3, 1, 1)).last_hidden_state[:, 1:]
        got = net.encode_image(x)
    assert torch.allclose(got, ref, atol=1e-5)
    big = AlignerVLM(vit_pretrained=str(tmp_path / "vit"), **{**TINY, "image_size": 48})
    assert big(torch.randn(1, 1, 48, 48))["attn"].shape == (1, 3, 6, 6)
    with pytest.raises(FileNotFoundError, match="vit_pretrained"):
        AlignerVLM(vit_pretrained=str(tmp_path / "missing"), **TINY)


def test_inference_wrapper_probabilities_and_state_dict(demo_net):
    torch.manual_seed(5)
    inf = build_aligner_vlm("demo", inference=True)
    # different random init -> different prompt cache until the trained weights are loaded (strict)
    assert not torch.allclose(inf.prompt_cache, demo_net.prompt_cache)
    inf.load_state_dict(demo_net.state_dict(), strict=True)
    assert torch.allclose(inf.prompt_cache, demo_net.prompt_cache)  # the cache follows the loaded weights
    inf.eval()
    demo_net.eval()
    x = torch.rand(1, 1, 128, 128)  # what verify_net_in_out feeds
    with torch.no_grad():
        probs = inf(x)
        ref = torch.sigmoid(demo_net(x)["logits"])
    assert isinstance(probs, torch.Tensor) and probs.shape == (1, 3) and probs.dtype == torch.float32
    assert bool((probs >= 0).all() and (probs <= 1).all())
    assert torch.allclose(probs, ref, atol=1e-6)
    pred = demo_net.predict_with_attention(torch.rand(2, 1, 128, 128), refined=True)
    assert pred["probs"].shape == (2, 3) and pred["attn"].shape == (2, 3, 128, 128)
    assert float(pred["attn"].max()) <= 1.0 + 1e-6
    assert upsample_attention(torch.ones(1, 1, 2, 2), (8, 8)).shape == (1, 1, 8, 8)


def test_prompt_cache_follows_nested_load_and_model_pickles():
    """Loading through a wrapper (DDP, Sequential) refreshes the cache; the whole model survives torch.save."""
    torch.manual_seed(6)
    a = AlignerVLM(text_pooling="mean", **TINY)
    torch.manual_seed(7)
    b = AlignerVLM(text_pooling="mean", **TINY)
    assert not torch.allclose(a.prompt_cache, b.prompt_cache)
    torch.nn.Sequential(b).load_state_dict(torch.nn.Sequential(a).state_dict())
    assert torch.allclose(a.prompt_cache, b.prompt_cache)
    buf = io.BytesIO()
    torch.save(a, buf)
    buf.seek(0)
    c = torch.load(buf, weights_only=False).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(c(x)["logits"], a.eval()(x)["logits"])


def test_bad_configuration_is_reported():
    with pytest.raises(ValueError, match="aligner"):
        AlignerVLM(aligner="magic", **TINY)
    with pytest.raises(ValueError, match="prompts"):
        AlignerVLM(prompts=["a", "b"], **TINY)
    with pytest.raises(ValueError, match="no prompt for classes"):
        AlignerVLM(classes=["edema", "other"], prompts={"edema": "edema"}, **TINY)
    with pytest.raises(ValueError, match="preset"):
        build_aligner_vlm("huge")
    net = AlignerVLM(classes=["pneumothorax", "pleural_effusion"], **TINY)
    assert net.prompts == ["pneumothorax", "pleural effusion"]
    with pytest.raises(ValueError, match="patch size"):
        net(torch.randn(1, 1, 30, 30))


def test_paper_preset_forward_backward_offline():
    """ViT-B/16 at 224 px, BERT-base-sized text encoder (random, offline unless Med-KEBERT is cached), TQN 4 x 768."""
    torch.manual_seed(0)
    net = build_aligner_vlm("paper")
    cfg = net.image_encoder.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (
        768,
        12,
        12,
        3072,
    )
    tcfg = net.text_encoder.config
    assert (tcfg.hidden_size, tcfg.num_hidden_layers, tcfg.num_attention_heads) == (768, 12, 12)
    assert len(net.layers) == 4 and net.fusion_dim == 768 and net.layers[0].ffn[0].out_features == 1024
    net.train()
    out = net(torch.randn(2, 1, 224, 224))
    assert out["logits"].shape == (2, 3) and out["attn"].shape == (2, 3, 14, 14)
    (out["logits"].sum() + out["attn_refined"].mean()).backward()
    assert net.layers[-1].cross_attn.in_proj_weight.grad is not None
    assert net.image_encoder.embeddings.patch_embeddings.projection.weight.grad is not None
