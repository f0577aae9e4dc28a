"""ViT weights from a local file (``vit_checkpoint``): timm, Hugging Face (old and new names), pytorch_pretrained_vit
and KAD's nested training checkpoints, written here by the tests themselves from a tiny random ViT (nothing
downloads). The loaded encoder must compute what the source ViT computes on the same (grey -> RGB) image."""

import os
import subprocess
import sys

import pytest
import torch
from transformers import ViTConfig, ViTModel

from bundle.errors import MissingWeightsError, find_missing_weights
from bundle.networks import (
    AlignerVLM,
    ViTCheckpointError,
    ViTCheckpointNotFoundError,
    build_from_checkpoint,
    load_vit_checkpoint,
    network_config,
    write_network_config,
)
from bundle.utils.atomic import torch_save_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = dict(patch_size=16, vit_hidden=32, vit_layers=2, vit_heads=2, vit_mlp=64)
NET = dict(classes=["a", "b"], text_hidden=32, text_layers=1, text_heads=2, text_intermediate=64, fusion_dim=32)


def _source(eps=1e-12, image_size=64) -> ViTModel:
    """The 'pretrained' RGB ViT the checkpoints are written from."""
    torch.manual_seed(0)
    cfg = ViTConfig(
        image_size=image_size, patch_size=16, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, layer_norm_eps=eps,
    )  # fmt: skip
    return ViTModel(cfg, add_pooling_layer=False).eval()


def _canon(vit: ViTModel) -> dict:
    """The source's weights by role: (top, {layer: {part: tensor}})."""
    sd = vit.state_dict()
    layers = {}
    for k, v in sd.items():
        if k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            layers.setdefault(int(i), {})[rest] = v
    return sd, layers


def _timm(vit) -> dict:
    sd, layers = _canon(vit)
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "pos_embed": sd["embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
        "head.weight": torch.randn(10, 32),  # a classifier head: ignored
        "head.bias": torch.zeros(10),
    }
    for i, p in layers.items():
        for wb in ("weight", "bias"):
            out[f"blocks.{i}.norm1.{wb}"] = p[f"layernorm_before.{wb}"]
            out[f"blocks.{i}.attn.qkv.{wb}"] = torch.cat([p[f"attention.{x}_proj.{wb}"] for x in "qkv"], dim=0)
            out[f"blocks.{i}.attn.proj.{wb}"] = p[f"attention.o_proj.{wb}"]
            out[f"blocks.{i}.norm2.{wb}"] = p[f"layernorm_after.{wb}"]
            out[f"blocks.{i}.mlp.fc1.{wb}"] = p[f"mlp.fc1.{wb}"]
            out[f"blocks.{i}.mlp.fc2.{wb}"] = p[f"mlp.fc2.{wb}"]
    return out


def _hf_old(vit, prefix="") -> dict:
    """transformers 4.x names (what KAD's ModelViT224 saved under image_encoder.vit.)."""
    sd, layers = _canon(vit)
    out = {prefix + k: v for k, v in sd.items() if not k.startswith("layers.")}
    old = {
        "attention.q_proj": "attention.attention.query",
        "attention.k_proj": "attention.attention.key",
        "attention.v_proj": "attention.attention.value",
        "attention.o_proj": "attention.output.dense",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
        "layernorm_before": "layernorm_before",
        "layernorm_after": "layernorm_after",
    }
    for i, p in layers.items():
        for rest, v in p.items():
            part, wb = rest.rsplit(".", 1)
            out[f"{prefix}encoder.layer.{i}.{old[part]}.{wb}"] = v
    out[prefix + "pooler.dense.weight"] = torch.randn(32, 32)  # KAD's ViTModel had its pooler: ignored
    return out


def _ppvit(vit, prefix="") -> dict:
    """pytorch_pretrained_vit names (KAD's ModelViT: the ViT under vit. and aliases of its parts at the top)."""
    sd, layers = _canon(vit)
    out = {
        "class_token": sd["embeddings.cls_token"],
        "positional_embedding.pos_embedding": sd["embeddings.position_embeddings"],
        "patch_embedding.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embedding.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
        "fc.weight": torch.randn(5, 32),
    }
    for i, p in layers.items():
        for wb in ("weight", "bias"):
            for x in "qkv":
                out[f"transformer.blocks.{i}.attn.proj_{x}.{wb}"] = p[f"attention.{x}_proj.{wb}"]
            out[f"transformer.blocks.{i}.proj.{wb}"] = p[f"attention.o_proj.{wb}"]
            out[f"transformer.blocks.{i}.norm1.{wb}"] = p[f"layernorm_before.{wb}"]
            out[f"transformer.blocks.{i}.norm2.{wb}"] = p[f"layernorm_after.{wb}"]
            out[f"transformer.blocks.{i}.pwff.fc1.{wb}"] = p[f"mlp.fc1.{wb}"]
            out[f"transformer.blocks.{i}.pwff.fc2.{wb}"] = p[f"mlp.fc2.{wb}"]
    aliases = {k: v for k, v in out.items() if not k.startswith(("norm.", "fc."))}  # ModelViT's own references
    return {**{prefix + "vit." + k: v for k, v in out.items()}, **{prefix + k: v for k, v in aliases.items()}}


def _kad(image_encoder: dict) -> dict:
    """KAD's training checkpoint layout (A3_CLIP/main.py save_obj)."""
    return {
        "model": {"decoder.layers.0.linear1.weight": torch.randn(8, 4), "mlp_head.0.weight": torch.randn(2, 4)},
        "image_encoder": image_encoder,
        "text_encoder": {"bert_model.embeddings.word_embeddings.weight": torch.randn(6, 4)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "weight_decay": 0.02, "params": [0, 1]}]},
        "lr_scheduler": {"t_initial": 100},
        "config": {"batch_size": 64, "image_res": 224},
        "epoch": 3,
    }


def _net(path=None, image_size=64, **kw) -> AlignerVLM:
    torch.manual_seed(1)
    return AlignerVLM(image_size=image_size, vit_checkpoint=path, **{**SIZES, **NET, **kw}).eval()


def _same_encoding(net, src, image_size):
    x = torch.rand(2, 1, image_size, image_size)
    with torch.no_grad():
        got = net.image_encoder(pixel_values=x).last_hidden_state
        want = src(pixel_values=x.repeat(1, 3, 1, 1), interpolate_pos_encoding=True).last_hidden_state
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_timm_safetensors_loads_and_computes_what_the_source_computes(tmp_path):
    from safetensors.torch import save_file

    src = _source(eps=1e-6)  # timm's LayerNorm eps
    path = str(tmp_path / "vit_timm.safetensors")
    save_file({k: v.contiguous() for k, v in _timm(src).items()}, path)
    net = _net(path)
    report = net.vit_checkpoint_report
    assert report["naming"] == "timm" and report["prefix"] == "" and report["missing"] == []
    assert report["loaded"] == len(net.image_encoder.state_dict())
    assert sorted(report["ignored"]) == ["head.bias", "head.weight"]
    assert report["norm_eps"] == 1e-6 and any("summed over 3 input channels" in a for a in report["adapted"])
    _same_encoding(net, src, 64)

    # the architecture sidecar records what rebuilds it (eps included, no file): same outputs from model.pt alone
    ckpt = str(tmp_path / "model.pt")
    torch_save_atomic(ckpt, net.state_dict())
    write_network_config(ckpt, net)
    cfg = network_config(net)
    assert cfg["vit_checkpoint"] is None and cfg["vit_norm_eps"] == 1e-6
    rebuilt = build_from_checkpoint(ckpt)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x)["logits"], net(x)["logits"])


@pytest.mark.parametrize("layout", ["hf_old", "pytorch_pretrained_vit"])
def test_kad_checkpoint_nested_prefixed_and_at_another_image_size(tmp_path, layout):
    """KAD's best_valid.pt: {"model", "image_encoder": {"vit.<ViT>"...}, "text_encoder", "optimizer", ...}. The ViT was
    trained at 64 px (4 x 4 positions); this network runs at 32 px: the position embeddings are interpolated as
    ViTModel interpolates them at run time."""
    eps = 1e-12 if layout == "hf_old" else 1e-6
    src = _source(eps=eps)
    encoder = _hf_old(src, prefix="vit.") if layout == "hf_old" else _ppvit(src)
    path = str(tmp_path / "best_valid.pt")
    torch.save(_kad(encoder), path)
    net = _net(path, image_size=32)
    report = net.vit_checkpoint_report
    assert report["prefix"] == "image_encoder.vit." and report["missing"] == []
    assert report["naming"] == ("huggingface" if layout == "hf_old" else "pytorch_pretrained_vit")
    assert report["ignored"] == (
        ["image_encoder.vit.pooler.dense.weight"] if layout == "hf_old" else ["image_encoder.vit.fc.weight"]
    )
    assert "position embeddings interpolated 4x4 -> 2x2" in report["adapted"] and report["norm_eps"] == eps
    _same_encoding(net, src, 32)


def test_a_state_dict_of_this_bundle_and_a_prefixed_hf_one_load(tmp_path):
    src = _source()
    wrapped = {"state_dict": {"module.image_encoder." + k: v for k, v in src.state_dict().items()}}
    path = str(tmp_path / "wrapped.bin")
    torch.save(wrapped, path)
    net = _net(path)
    assert net.vit_checkpoint_report["prefix"] == "state_dict.module.image_encoder."
    _same_encoding(net, src, 64)


def test_mismatched_shapes_and_layers_are_refused_naming_key_and_sizes(tmp_path):
    path = str(tmp_path / "vit.pt")
    torch.save(_timm(_source()), path)
    with pytest.raises(ViTCheckpointError) as e:
        _net(path, vit_hidden=48, vit_heads=2)
    msg = str(e.value)
    assert path in msg and "patch_embed.proj.weight has shape (32, 3, 16, 16)" in msg and "(48, 1, 16, 16)" in msg
    assert "vit_hidden=32, patch_size=16, vit_layers=2, vit_mlp=64, trained at 64 px" in msg
    with pytest.raises(ViTCheckpointError, match="2 transformer layers in the checkpoint, vit_layers=3"):
        _net(path, vit_layers=3)
    with pytest.raises(ViTCheckpointError, match=r"blocks.0.mlp.fc1.weight has shape \(64, 32\).*\(128, 32\)"):
        _net(path, vit_mlp=128)
    with pytest.raises(ViTCheckpointError, match="patch_embed.proj.weight has shape"):
        _net(path, patch_size=8)


def test_files_that_are_not_vits_or_not_plain_tensors_are_refused(tmp_path):
    resnet = str(tmp_path / "kad_resnet.pt")  # KAD's default image encoder is a ResNet-50
    torch.save(_kad({"resnet.conv1.weight": torch.randn(4, 3, 7, 7), "res_l1.weight": torch.randn(4, 4)}), resnet)
    with pytest.raises(ViTCheckpointError, match="no ViT found .*ResNet-50"):
        _net(resnet)

    pickled = str(tmp_path / "objects.pt")
    torch.save({"image_encoder": _timm(_source()), "args": _Args()}, pickled)
    with pytest.raises(ViTCheckpointError, match=r"weights_only=True\) refused it.*save only its weights"):
        _net(pickled)

    broken = str(tmp_path / "broken.safetensors")
    with open(broken, "wb") as f:
        f.write(b"not a safetensors file")
    with pytest.raises(ViTCheckpointError, match="not a readable safetensors file"):
        _net(broken)

    layer_scale = _timm(_source())
    layer_scale["blocks.0.ls1.gamma"] = torch.ones(32)  # DeiT-3 style layer scale: not a plain ViT
    path = str(tmp_path / "deit3.pt")
    torch.save(layer_scale, path)
    with pytest.raises(ViTCheckpointError, match="blocks.0.ls1.gamma .a weight inside a block"):
        _net(path)

    with pytest.raises(ValueError, match="both given"):
        _net(path, vit_pretrained=str(tmp_path))


class _Args:  # an arbitrary pickled object, as in checkpoints that saved argparse results or configs
    lr = 1e-4


def test_missing_final_norm_is_reported_and_kept(tmp_path, caplog):
    sd = _timm(_source())
    del sd["norm.weight"], sd["norm.bias"]
    path = str(tmp_path / "no_norm.pt")
    torch.save(sd, path)
    with caplog.at_level("WARNING", logger="bundle.networks"):
        net = _net(path)
    assert net.vit_checkpoint_report["missing"] == ["layernorm.weight", "layernorm.bias"]
    assert "has no ['layernorm.weight', 'layernorm.bias']: kept their random initialisation" in caplog.text


def test_a_missing_file_is_a_missing_weights_error(tmp_path):
    missing = str(tmp_path / "nowhere" / "vit.safetensors")
    with pytest.raises(ViTCheckpointNotFoundError) as e:
        _net(missing)
    assert isinstance(e.value, MissingWeightsError) and isinstance(e.value, FileNotFoundError)
    line = e.value.cli_message()
    assert "\n" not in line and line.startswith(f"ViT checkpoint {missing} does not exist")
    assert "hf download google/vit-base-patch16-224-in21k model.safetensors --local-dir models/vit-b16" in line
    assert line.endswith("--network_def#vit_checkpoint models/vit-b16/model.safetensors")
    try:  # MONAI's ConfigComponent wraps it: the command-line hook still finds it in the chain
        raise RuntimeError("Failed to instantiate component") from e.value
    except RuntimeError as wrapped:
        assert find_missing_weights(wrapped) is e.value
    import pickle

    assert pickle.loads(pickle.dumps(e.value)).cli_message() == line
    with pytest.raises(ViTCheckpointNotFoundError):
        load_vit_checkpoint(_source(), missing)


@pytest.mark.slow
def test_command_line_with_a_missing_checkpoint_ends_with_one_line(tmp_path):
    """``python -m monai.bundle`` building train.yaml's network (no data needed: classes given) with a missing file."""
    missing = str(tmp_path / "nowhere" / "vit.pt")
    args = [
        sys.executable, "-m", "monai.bundle", "run", "network_def", "--config_file",
        os.path.join(ROOT, "configs", "train.yaml"), "--classes", "['a', 'b']", "--network_def#vit_checkpoint", missing,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("MLFLOW_TRACKING_URI", None)
    p = subprocess.run(args, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    lines = p.stderr.rstrip("\n").splitlines()
    assert p.returncode == 1, p.stderr[-3000:]
    assert lines[-1].startswith(f"ViT checkpoint {missing} does not exist"), p.stderr[-3000:]
    assert lines[-1].endswith("--network_def#vit_checkpoint models/vit-b16/model.safetensors"), p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
