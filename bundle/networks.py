"""AlignerVLM: a KAD-style chest X-ray vision-language classifier whose per-class attention can be aligned.

image (B, 1, S, S) -> ViT patch tokens (B, N, D_img) -> Linear -> LayerNorm -> memory (B, N, d)
class prompts -> BERT -> pooled (C, D_txt) -> MLP (Linear-GELU-Linear) -> LayerNorm -> queries (C, d), shared by
the whole batch
fusion: pre-norm transformer decoder (self-attention over queries, cross-attention to patches, FFN) x L
outputs: logits (B, C); attn (B, C, h, w) = last layer's cross-attention, head-averaged, softmax over patches;
         attn_refined (B, C, h, w) in [0, 1] = the attention aligner head applied to attn.

See docs/model.md for shapes, presets and how to plug in Med-KEBERT or a pretrained ViT.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import pickle
import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ViTConfig, ViTModel

from bundle.errors import HF_DOWNLOAD, MissingWeightsError, fetch_target, looks_like_hub_id
from bundle.text import build_text_encoder, encode_prompts, pool_text, tokenize_prompts
from bundle.utils.atomic import file_sha256, read_json, write_json_atomic

logger = logging.getLogger(__name__)

DEFAULT_CLASSES = ("nodule_mass", "pleural_effusion", "edema")
# Prompts of the paper's three findings; other class names default to the name with "_" -> " ".
DEFAULT_PROMPTS = {"nodule_mass": "nodule or mass", "pleural_effusion": "pleural effusion", "edema": "edema"}

# The presets, for Python use (build_aligner_vlm, benchmarks, tests). The configs list the sizes themselves:
# configs/train.yaml's network_def (and configs/inference.yaml's) is DEMO_PRESET, configs/paper.yaml overrides it
# with PAPER_PRESET; tests/test_workflow.py checks that they agree.
# Demo: trains on 2 CPU cores (docs/model.md has the measured speed). 96 px / patch 16 -> 6 x 6 attention maps;
# 4 ViT layers (the quick study measured this size: docs/results.md).
DEMO_PRESET = {
    "image_size": 96,
    "patch_size": 16,
    "vit_hidden": 192,
    "vit_layers": 4,
    "vit_heads": 3,
    "vit_mlp": 768,
    "text_encoder": "random-small",
    "text_hidden": 128,
    "text_layers": 2,
    "text_heads": 2,
    "text_intermediate": 512,
    # A random BERT's pooler squeezes the prompts together (cosine 0.999); mean pooling keeps them apart (~0.85).
    "text_pooling": "mean",
    "fusion_layers": 1,
    "fusion_dim": 192,
    "fusion_heads": 4,
    "fusion_ffn": 768,
    # PyTorch's default init for the from-scratch demo (KAD's N(0, 0.02) left the loss at the label prior for
    # two epochs on the synthetic benchmark: docs/model.md); the paper preset keeps KAD's init.
    "fusion_init_std": None,
}

# Paper: ViT-B/16 at 224 px (14 x 14 maps), Med-KEBERT (BERT-base sized; a random BERT-base-sized encoder is built
# offline when Med-KEBERT is not in the local HF cache), KAD's TQN: 4 layers, d = 768, 4 heads, FFN 1024.
PAPER_PRESET = {
    "image_size": 224,
    "patch_size": 16,
    "vit_hidden": 768,
    "vit_layers": 12,
    "vit_heads": 12,
    "vit_mlp": 3072,
    "text_encoder": "xmcmic/Med-KEBERT",
    "text_fallback": "random-base",
    "text_pooling": "pooler",
    "fusion_layers": 4,
    "fusion_dim": 768,
    "fusion_heads": 4,
    "fusion_ffn": 1024,
    "vit_checkpoint": None,  # a ViT-B/16 weights file (timm / Hugging Face / KAD), loaded by load_vit_checkpoint
    "aligner": "projector",  # the paper's alignment projector head on the fused features
}

PRESETS = {"demo": DEMO_PRESET, "paper": PAPER_PRESET}

ALIGNERS = ("max_norm", "conv", "sigmoid", "projector")
CLASSIFIERS = ("linear", "per_class")
POOLINGS = ("pooler", "cls", "mean")


def _init_normal(module: nn.Module, std: float = 0.02) -> None:
    """KAD's initialisation of the fusion part: Linear / attention weights ~ N(0, std), biases 0, LayerNorm 1/0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.MultiheadAttention):
            if m.in_proj_weight is not None:
                nn.init.normal_(m.in_proj_weight, std=std)
            else:  # separate q/k/v projections (kdim != embed_dim)
                for w in (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight):
                    nn.init.normal_(w, std=std)
            if m.in_proj_bias is not None:
                nn.init.zeros_(m.in_proj_bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class FusionDecoderLayer(nn.Module):
    """Pre-norm transformer decoder layer (DETR/KAD ``normalize_before=True``) that can return cross-attention.

    Written out (instead of nn.TransformerDecoderLayer) because that class never returns attention weights.
    The cross-attention has no dropout on its weights: nn.MultiheadAttention returns the *dropped-out* weights,
    which would then no longer sum to 1 and would feed noise into the alignment loss; dropout is applied to the
    attention output instead.
    """

    def __init__(self, d_model: int, heads: int, ffn: int, dropout: float = 0.1):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.drop1 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.cross_attn = nn.MultiheadAttention(d_model, heads, dropout=0.0, batch_first=True)
        self.drop2 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, d_model))
        self.drop3 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, need_weights: bool = False):
        """x: (B, C, d) queries, memory: (B, N, d). Returns (x, attn) with attn (B, C, N) or None."""
        h = self.norm1(x)
        x = x + self.drop1(self.self_attn(h, h, h, need_weights=False)[0])
        h = self.norm2(x)
        out, attn = self.cross_attn(h, memory, memory, need_weights=need_weights, average_attn_weights=True)
        x = x + self.drop2(out)
        x = x + self.drop3(self.ffn(self.norm3(x)))
        return x, attn


class ConvAligner(nn.Module):
    """DWARF-style refiner: a small residual conv over each map, exactly the identity at initialisation.

    P = minmax(Mn + conv(Mn)) with Mn = M / max(M) per map; the last conv is zero-initialised so training starts
    from P = min-max normalised attention. The same conv is shared by all classes (maps are (B*C, 1, h, w)).
    """

    def __init__(self, channels: int = 8, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.body = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, 1, 3, padding=1))
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        b, c, h, w = m.shape
        mn = m / m.amax(dim=(-2, -1), keepdim=True).clamp_min(self.eps)
        x = mn.reshape(b * c, 1, h, w)
        x = (x + self.body(x)).reshape(b, c, h, w)
        lo = x.amin(dim=(-2, -1), keepdim=True)
        hi = x.amax(dim=(-2, -1), keepdim=True)
        return (x - lo) / (hi - lo).clamp_min(self.eps)


class SigmoidAligner(nn.Module):
    """P_c = sigmoid(w_c * log(M * N) + b_c): log-ratio to the uniform map, a learnable per-class slope/offset.

    At initialisation (w = 1, b = 0) a uniform map gives 0.5 and a patch with e times the uniform weight 0.73.
    """

    def __init__(self, num_classes: int, eps: float = 1e-8):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_classes))
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, m: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """``classes``: the class indices of m's maps when m holds a subset of the classes (class-subset forward)."""
        n = m.shape[-2] * m.shape[-1]
        z = torch.log(m.clamp_min(self.eps) * n)
        w, b = (self.weight, self.bias) if classes is None else (self.weight[classes], self.bias[classes])
        return torch.sigmoid(w.view(1, -1, 1, 1) * z + b.view(1, -1, 1, 1))


class MaxNormAligner(nn.Module):
    """P = M / max over patches (parameter-free): L_AL can only be lowered by moving the attention itself."""

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        return m / m.amax(dim=(-2, -1), keepdim=True).clamp_min(self.eps)


class ProjectorAligner(nn.Module):
    """The paper's alignment projector head on the fused features (its second head beside the classifier).

    From the per-class fused feature f_c (the decoder output, (B, C, d)) and the per-patch image features m_n (the
    decoder memory, (B, N, d)):

        q_c = Linear(d, k)(GELU(Linear(d, d)(f_c))),  k_n = Linear(d, k)(m_n),  s_cn = q_c . k_n / sqrt(k)
        P_c = M_c exp(s_c) / max_n (M_c exp(s_c))      (computed as exp(z - max z), z = log M + s)

    s is a learned per-class, per-patch correction of the cross-attention logits, so P is in [0, 1] with max 1 in
    every map. The query MLP's last Linear is zero-initialised (DWARF starts its refiner at the identity): s = 0 and
    P = M / max M (the max_norm aligner) at initialisation; L_AL reaches that layer from the first step and the rest
    of the head from the second. Gradients also flow through M into the fusion decoder and the encoders.
    """

    def __init__(self, dim: int, proj_dim: int | None = None, eps: float = 1e-8):
        super().__init__()
        self.eps = eps
        k = int(proj_dim or min(dim, 256))
        self.proj_dim = k
        self.query = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, k))
        self.key = nn.Linear(dim, k)
        self.reset_last()

    def reset_last(self) -> None:
        """Zero the query MLP's last layer (P = M / max M); called again after a re-initialisation of the head."""
        nn.init.zeros_(self.query[-1].weight)
        nn.init.zeros_(self.query[-1].bias)

    def forward(self, m: torch.Tensor, feats: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """m (B, C, h, w) attention, feats (B, C, d) per-class fused features, memory (B, h*w, d) -> P (B, C, h, w)."""
        b, c, h, w = m.shape
        q = self.query(feats)  # (B, C, k)
        key = self.key(memory)  # (B, N, k)
        s = torch.einsum("bck,bnk->bcn", q, key) * (self.proj_dim**-0.5)
        z = torch.log(m.reshape(b, c, h * w).clamp_min(self.eps)) + s
        return torch.exp(z - z.amax(dim=-1, keepdim=True)).reshape(b, c, h, w)


def _resolve_prompts(classes: Sequence[str], prompts) -> list[str]:
    if prompts is None:
        return [DEFAULT_PROMPTS.get(c, c.replace("_", " ")) for c in classes]
    if isinstance(prompts, Mapping):
        missing = [c for c in classes if c not in prompts]
        if missing:
            raise ValueError(
                f"networks prompts: no prompt for classes {missing}; give one per class in {list(classes)}"
            )
        return [str(prompts[c]) for c in classes]
    prompts = [str(p) for p in prompts]
    if len(prompts) != len(classes):
        raise ValueError(f"networks prompts: {len(prompts)} prompts for {len(classes)} classes {list(classes)}")
    return prompts


# Folder names (lower case) a ViT is known under on the hub, to suggest what to fetch into a missing folder.
DEFAULT_VIT_REPO = "google/vit-base-patch16-224-in21k"
KNOWN_VITS = {"vit-base-patch16-224": "google/vit-base-patch16-224", "vit-base-patch16-224-in21k": DEFAULT_VIT_REPO}


def _vit_not_found(spec: str, reason: str = "") -> MissingWeightsError:
    repo, local_dir = fetch_target(spec, KNOWN_VITS, DEFAULT_VIT_REPO)
    hint = (
        "A folder must hold what ViTModel.save_pretrained writes (config.json and model.safetensors or "
        "pytorch_model.bin); HF_HOME or HF_HUB_CACHE select another cache; vit_pretrained=None builds a random ViT"
    )
    return MissingWeightsError("pretrained ViT", spec, "vit_pretrained", repo, local_dir, reason, hint)


def _build_vit(vit_pretrained, image_size, patch_size, in_channels, hidden, layers, heads, mlp, dropout) -> ViTModel:
    if vit_pretrained:
        spec = str(vit_pretrained)
        path = os.path.expanduser(spec)
        if not looks_like_hub_id(spec) and not os.path.isdir(path):
            raise _vit_not_found(spec)  # nothing is downloaded: a missing folder stops here with what to fetch
        try:
            vit = ViTModel.from_pretrained(
                path if os.path.exists(path) else spec, local_files_only=True, add_pooling_layer=False
            )
        except (OSError, ValueError) as e:
            reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}" if os.path.exists(path) else ""
            raise _vit_not_found(spec, reason) from e
        _adapt_vit_channels(vit, in_channels)
        return vit
    if hidden % heads:
        raise ValueError(f"vit_hidden={hidden} must be divisible by vit_heads={heads}")
    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
    config = ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=in_channels,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=mlp,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return ViTModel(config, add_pooling_layer=False)


@torch.no_grad()
def _adapt_vit_channels(vit: ViTModel, in_channels: int) -> None:
    """Make a pretrained (RGB) ViT take ``in_channels`` inputs by summing its patch-embedding kernel over colours.

    Summing is exactly equivalent to repeating a grey image into 3 channels, without the 3x input memory/compute.
    Only 3 -> 1 (sum) and k -> k are supported; anything else raises.
    """
    pe = vit.embeddings.patch_embeddings
    have = pe.num_channels
    if have == in_channels:
        return
    if in_channels != 1:
        raise ValueError(
            f"pretrained ViT has {have} input channels; in_channels={in_channels} is not supported (use 1)"
        )
    old = pe.projection
    new = nn.Conv2d(1, old.out_channels, old.kernel_size, old.stride, old.padding, bias=old.bias is not None)
    new.weight.copy_(old.weight.sum(dim=1, keepdim=True))
    if old.bias is not None:
        new.bias.copy_(old.bias)
    pe.projection = new
    pe.num_channels = 1
    vit.config.num_channels = 1


# ------------------------------------------------------------------------------- ViT weights from a checkpoint file
# Written here because transformers renames old ViT checkpoints only inside from_pretrained (a folder with its
# config.json), and knows neither timm's nor pytorch_pretrained_vit's names nor KAD's nested training checkpoints
# (timm's own converter needs timm). Both the file's keys and this ViTModel's keys are translated to one canonical
# naming, so the mapping does not depend on the transformers version (4.x: encoder.layer.<i>, 5.x: layers.<i>).
_VIT_TOP_KEYS = {
    # timm VisionTransformer
    "cls_token": "cls",
    "pos_embed": "pos",
    "patch_embed.proj.weight": "patch.weight",
    "patch_embed.proj.bias": "patch.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
    # Hugging Face ViTModel (every transformers version)
    "embeddings.cls_token": "cls",
    "embeddings.position_embeddings": "pos",
    "embeddings.patch_embeddings.projection.weight": "patch.weight",
    "embeddings.patch_embeddings.projection.bias": "patch.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    # pytorch_pretrained_vit (KAD's ModelViT)
    "class_token": "cls",
    "positional_embedding.pos_embedding": "pos",
    "patch_embedding.weight": "patch.weight",
    "patch_embedding.bias": "patch.bias",
}
_VIT_BLOCK = re.compile(r"^(?:blocks|encoder\.layer|layers|transformer\.blocks)\.(\d+)\.(.+)$")
_VIT_BLOCK_PARTS = {
    "norm1": "norm1",
    "layernorm_before": "norm1",
    "attn.qkv": "qkv",  # timm: q, k, v stacked along the output axis
    "attn.proj": "o",
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.output.dense": "o",
    "attention.q_proj": "q",
    "attention.k_proj": "k",
    "attention.v_proj": "v",
    "attention.o_proj": "o",
    "attn.proj_q": "q",
    "attn.proj_k": "k",
    "attn.proj_v": "v",
    "proj": "o",
    "norm2": "norm2",
    "layernorm_after": "norm2",
    "mlp.fc1": "fc1",
    "mlp.fc2": "fc2",
    "intermediate.dense": "fc1",
    "output.dense": "fc2",
    "pwff.fc1": "fc1",
    "pwff.fc2": "fc2",
}
# The patch embedding's key locates the ViT inside a checkpoint (its prefix) and tells the naming.
_VIT_ANCHORS = {
    "patch_embed.proj.weight": "timm",
    "embeddings.patch_embeddings.projection.weight": "huggingface",
    "patch_embedding.weight": "pytorch_pretrained_vit",
}
# LayerNorm eps of the models a checkpoint comes from (Hugging Face's ViTs: 1e-12, ViTConfig's default).
_VIT_NORM_EPS = {"timm": 1e-6, "pytorch_pretrained_vit": 1e-6}
_EXTRA_TOKENS = ("reg_token", "dist_token")  # timm variants whose sequence a plain ViT does not reproduce


class ViTCheckpointError(ValueError):
    """A ``vit_checkpoint`` file that cannot be read or does not fit the ViT built from the vit_* sizes."""


class ViTCheckpointNotFoundError(MissingWeightsError):
    """``vit_checkpoint`` names a file that does not exist (nothing is ever downloaded). A MissingWeightsError, so the
    command line ends with its one-line message."""

    def __init__(self, spec: str, reason: str = "") -> None:  # noqa: B042 (__reduce__ below)
        hint = (
            "a timm, Hugging Face ViTModel, pytorch_pretrained_vit or KAD checkpoint (.safetensors, .bin, .pt, .pth) of "
            "a ViT with the network's vit_* sizes; vit_checkpoint=None builds a random ViT"
        )
        super().__init__("ViT checkpoint", spec, "vit_checkpoint", DEFAULT_VIT_REPO, "models/vit-b16", reason, hint)

    def __reduce__(self):
        return (type(self), (self.spec, self.reason))

    def render(self, cli: bool) -> str:
        where = os.path.abspath(os.path.expanduser(self.spec))
        example = f"{self.local_dir}/model.safetensors"
        use = f"--network_def#vit_checkpoint {example}" if cli else f"vit_checkpoint={example!r}"
        return (
            f"ViT checkpoint {where} does not exist (the file is missing): fetch one on a machine with internet access, "
            f"e.g. '{HF_DOWNLOAD} {self.repo_id} model.safetensors --local-dir {self.local_dir}' (ViT-B/16, ImageNet-21k, "
            f"as KAD's ViT; a KAD or timm checkpoint works too), copy the file to {where} or pass {use}"
        )


def _set_vit_norm_eps(vit: ViTModel, eps: float) -> None:
    for m in vit.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = float(eps)
    vit.config.layer_norm_eps = float(eps)


def _canonical_vit_key(key: str) -> str | None:
    """``blocks.3.q.weight``-style name of a ViT weight in any supported naming; ``"?" + key`` for an unknown weight
    inside a block, None for a key that is not part of a ViT encoder (heads, pooler)."""
    if key in _VIT_TOP_KEYS:
        return _VIT_TOP_KEYS[key]
    m = _VIT_BLOCK.match(key)
    if m is None:
        return None
    part, _, wb = m.group(2).rpartition(".")
    if wb in ("weight", "bias") and part in _VIT_BLOCK_PARTS:
        return f"blocks.{int(m.group(1))}.{_VIT_BLOCK_PARTS[part]}.{wb}"
    return "?" + key


def _flatten_tensors(obj, prefix: str = "", out: dict | None = None, depth: int = 0) -> dict:
    """Every tensor of nested dicts (a training checkpoint: {"model": ..., "image_encoder": {...}}) by dotted path."""
    out = {} if out is None else out
    if isinstance(obj, torch.Tensor):
        out[prefix[:-1]] = obj
    elif isinstance(obj, Mapping) and depth < 8:
        for k, v in obj.items():
            _flatten_tensors(v, f"{prefix}{k}.", out, depth + 1)
    return out


def _read_checkpoint_file(path: str):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError
            raise ViTCheckpointError(f"vit_checkpoint {path} is not a readable safetensors file ({e})") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = (str(e).splitlines() or [""])[0][:200]
        raise ViTCheckpointError(
            f"vit_checkpoint {path}: torch.load(weights_only=True) refused it ({first}): the file holds Python objects "
            'besides tensors and plain containers. If you trust it, save only its weights: python -c "import torch; '
            f"c = torch.load({path!r}, weights_only=False); torch.save(c['image_encoder'], 'vit.pt')\" (or c, "
            "c['model'], c['state_dict']), or convert it to .safetensors"
        ) from e
    except Exception as e:  # a truncated or foreign file
        raise ViTCheckpointError(
            f"vit_checkpoint {path} is not a readable PyTorch or safetensors file ({type(e).__name__}: "
            f"{(str(e).splitlines() or [''])[0][:200]})"
        ) from e


def _checkpoint_sizes(src: Mapping[str, torch.Tensor]) -> str:
    """What a canonical ViT state says about its sizes, for error messages."""
    parts = []
    patch = src.get("patch.weight")
    if patch is not None and patch.ndim == 4:
        parts += [f"vit_hidden={patch.shape[0]}", f"patch_size={patch.shape[-1]}"]
    layers = {k.split(".")[1] for k in src if k.startswith("blocks.")}
    parts.append(f"vit_layers={len(layers)}")
    fc1 = src.get("blocks.0.fc1.weight")
    if fc1 is not None:
        parts.append(f"vit_mlp={fc1.shape[0]}")
    pos = src.get("pos")
    if pos is not None and pos.ndim == 3 and patch is not None:
        side = math.isqrt(pos.shape[1] - 1)
        parts.append(f"trained at {side * patch.shape[-1]} px")
    return ", ".join(parts)


def _resize_position_embeddings(pos: torch.Tensor, n_target: int, patch_size: int) -> torch.Tensor:
    """(1, 1 + n, D) -> (1, n_target, D): Hugging Face's ViTEmbeddings.interpolate_pos_encoding (bicubic,
    align_corners=False), the function ViTModel itself runs for inputs of another size."""
    side = math.isqrt(n_target - 1)
    try:
        from types import SimpleNamespace

        from transformers.models.vit.modeling_vit import ViTEmbeddings

        holder = SimpleNamespace(position_embeddings=pos, patch_size=patch_size)
        out = ViTEmbeddings.interpolate_pos_encoding(
            holder, pos.new_zeros(1, n_target, pos.shape[-1]), side * patch_size, side * patch_size
        )
    except (ImportError, AttributeError, TypeError):  # transformers moved it: the same interpolation
        old = math.isqrt(pos.shape[1] - 1)
        grid = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
        out = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, side * side, -1)], dim=1)
    return out.detach().clone()


def _select_vit_weights(flat: Mapping[str, torch.Tensor], path: str) -> tuple[str, str, dict]:
    """``(prefix, naming, {key without prefix: tensor})`` of the ViT in a flattened checkpoint. With several (a full
    training checkpoint, an alias module), the prefix that yields the most ViT weights wins, then the shortest."""
    candidates = {}
    for k in flat:
        for anchor, naming in _VIT_ANCHORS.items():
            if k == anchor or k.endswith("." + anchor):
                candidates[k[: len(k) - len(anchor)]] = naming
    if not candidates:
        sample = sorted({k.split(".", 1)[0] for k in flat})[:8]
        raise ViTCheckpointError(
            f"vit_checkpoint {path}: no ViT found (no key ending in {' / '.join(_VIT_ANCHORS)}; its "
            f"{len(flat)} tensors start with {sample}). Give a ViT checkpoint (timm, Hugging Face ViTModel, "
            "pytorch_pretrained_vit, or a KAD checkpoint trained with its ViT image encoder; KAD's ResNet-50 / "
            "DenseNet encoders are not ViTs)"
        )
    scored = []
    for prefix, naming in candidates.items():
        sub = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
        n = sum(1 for k in sub if (c := _canonical_vit_key(k)) is not None and not c.startswith("?"))
        scored.append((-n, len(prefix), prefix, naming, sub))
    scored.sort(key=lambda t: t[:3])
    if len(scored) > 1:
        logger.info(
            "vit_checkpoint %s holds %d ViT-like weight sets (prefixes %s): using %r (the most weights)",
            path,
            len(scored),
            [t[2] for t in scored],
            scored[0][2],
        )
    return scored[0][2], scored[0][3], scored[0][4]


def load_vit_checkpoint(vit: ViTModel, path: str | os.PathLike, norm_eps: float | None = None) -> dict:
    """Load a ViT checkpoint file into ``vit`` (a ViTModel built with the intended sizes); returns a report.

    The file: ``.safetensors`` (safetensors) or anything else through ``torch.load(weights_only=True)`` (no code is
    unpickled). Nested dicts are searched (KAD: ``{"image_encoder": {"vit.embeddings...": ...}, "model": ...}``;
    ``state_dict``/``model``/``module.`` wrappers) and the ViT's prefix is found by its patch embedding. Names in
    timm (``blocks.<i>.attn.qkv``, split into q/k/v), Hugging Face (``encoder.layer.<i>`` or ``layers.<i>``) or
    pytorch_pretrained_vit (``transformer.blocks.<i>``) layouts are mapped to this ViTModel's.

    Adapted, not refused: an RGB patch kernel for a 1-channel ViT (summed over colours, as ``_adapt_vit_channels``)
    and position embeddings of another grid (interpolated as ViTModel does). Refused (ViTCheckpointError, naming the
    key and both shapes and the checkpoint's sizes): any other shape difference, another number of layers, weights
    inside the blocks that a plain ViT lacks, register/distillation tokens. Missing top-level weights (e.g. the final
    LayerNorm) keep their initialisation, with a warning; weights outside the encoder (heads, pooler) are ignored and
    listed. ``norm_eps``: the LayerNorm eps to set (None: 1e-6 for timm / pytorch_pretrained_vit names, else kept).
    Report keys: file, prefix, naming, loaded, missing, ignored, adapted, norm_eps.
    """
    spec = os.fspath(path)
    path = os.path.expanduser(spec)
    if not os.path.isfile(path):
        raise ViTCheckpointNotFoundError(spec)
    flat = _flatten_tensors(_read_checkpoint_file(path))
    prefix, naming, sub = _select_vit_weights(flat, path)

    src, names, ignored, problems = {}, {}, [], []
    for k, v in sub.items():
        c = _canonical_vit_key(k)
        if c is None:
            (problems if k in _EXTRA_TOKENS else ignored).append(prefix + k)
            continue
        if c.startswith("?"):
            problems.append(f"{prefix}{k} (a weight inside a block that a plain ViT does not have)")
            continue
        if ".qkv." in c:
            base, wb = c.split(".qkv.")
            for part, chunk in zip("qkv", v.chunk(3, dim=0), strict=True):
                src[f"{base}.{part}.{wb}"], names[f"{base}.{part}.{wb}"] = chunk, f"{prefix}{k}[{part}]"
        else:
            src[c], names[c] = v, prefix + k
    problems = [f"{p}: a ViT variant with extra tokens" if p.endswith(_EXTRA_TOKENS) else p for p in problems]

    own = vit.state_dict()
    target = {}
    for k in own:
        c = _canonical_vit_key(k)
        if c is None or c.startswith("?"):
            raise ViTCheckpointError(
                f"this transformers version names a ViT weight {k!r}, which bundle.networks.load_vit_checkpoint does "
                "not map; use vit_pretrained (a ViTModel folder) instead"
            )
        target[c] = k
    have = {c.split(".")[1] for c in src if c.startswith("blocks.")}
    want = {c.split(".")[1] for c in target if c.startswith("blocks.")}
    if have != want:
        problems.append(f"{len(have)} transformer layers in the checkpoint, vit_layers={len(want)} in this network")

    state, missing, adapted = {}, [], []
    patch_size = int(vit.config.patch_size)
    for c, k in target.items():
        if c not in src:
            if not c.startswith("blocks.") or have == want:
                missing.append(k)
            continue
        t, ref = src[c], own[k]
        if c == "patch.weight" and t.ndim == 4 and t.shape[0] == ref.shape[0] and t.shape[2:] == ref.shape[2:]:
            if t.shape[1] != ref.shape[1] and ref.shape[1] == 1:
                t = t.sum(dim=1, keepdim=True)  # = the RGB kernel on a grey image repeated into 3 channels
                adapted.append(f"patch kernel summed over {src[c].shape[1]} input channels")
        if c == "pos" and t.ndim == 3 and t.shape[-1] == ref.shape[-1] and t.shape[1] != ref.shape[1]:
            n_old, n_new = t.shape[1] - 1, ref.shape[1] - 1
            if math.isqrt(n_old) ** 2 == n_old and math.isqrt(n_new) ** 2 == n_new:
                t = _resize_position_embeddings(t, ref.shape[1], patch_size)
                s_old, s_new = math.isqrt(n_old), math.isqrt(n_new)
                adapted.append(f"position embeddings interpolated {s_old}x{s_old} -> {s_new}x{s_new}")
        if tuple(t.shape) != tuple(ref.shape):
            problems.append(f"{names[c]} has shape {tuple(t.shape)}, this network's {k} {tuple(ref.shape)}")
            continue
        state[k] = t.to(dtype=ref.dtype)
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... ({len(problems) - 6} more)" if len(problems) > 6 else "")
        raise ViTCheckpointError(
            f"vit_checkpoint {path} (prefix {prefix!r}, {naming} names) does not fit this ViT: {shown}. The checkpoint "
            f"is a ViT with {_checkpoint_sizes(src)}; set the network's vit_* sizes (and vit_heads) to match"
        )
    with torch.no_grad():
        vit.load_state_dict(state, strict=False)
    eps = norm_eps if norm_eps is not None else _VIT_NORM_EPS.get(naming)
    if eps is not None:
        _set_vit_norm_eps(vit, eps)
    report = {
        "file": path,
        "prefix": prefix,
        "naming": naming,
        "loaded": len(state),
        "missing": missing,
        "ignored": ignored,
        "adapted": adapted,
        "norm_eps": float(vit.config.layer_norm_eps),
    }
    logger.info(
        "ViT weights: %d tensors from %s (prefix %r, %s names)%s",
        len(state),
        path,
        prefix,
        naming,
        "".join(f"; {a}" for a in adapted),
    )
    if missing:
        logger.warning("vit_checkpoint %s has no %s: kept their random initialisation", path, missing)
    if ignored:
        logger.info(
            "vit_checkpoint %s: ignored %d tensors outside the ViT encoder: %s", path, len(ignored), ignored[:8]
        )
    return report


def _refresh_after_load(module: "AlignerVLM", incompatible_keys) -> None:
    """load_state_dict post-hook (a module-level function, not a lambda, so that the network stays picklable)."""
    module.refresh_prompt_cache()


class AlignerVLM(nn.Module):
    """Image-text fusion classifier with per-class cross-attention maps (see module docstring / docs/model.md).

    Args:
        classes: class names (order = logit order).
        prompts: one text prompt per class (list in class order or dict by class); default DEFAULT_PROMPTS.
        image_size, patch_size, in_channels: image geometry; attention maps are (image_size / patch_size)^2.
        vit_hidden, vit_layers, vit_heads, vit_mlp, vit_dropout: size of a randomly initialised ViT.
        vit_pretrained: a local ViTModel directory / cached hub id (overrides the sizes; RGB kernels are summed to 1
            channel; other image sizes interpolate its position embeddings).
        vit_checkpoint: a local weights file (.safetensors / .bin / .pt / .pth) for the ViT built from the sizes above:
            a timm, Hugging Face ViTModel, pytorch_pretrained_vit or KAD checkpoint, nested dicts and prefixes
            allowed (``load_vit_checkpoint``). Shapes must fit, except the input channels (RGB summed) and the position
            embeddings (interpolated to image_size).
        vit_norm_eps: the ViT's LayerNorm eps; None: 1e-12 (Hugging Face's default), or 1e-6 for a timm /
            pytorch_pretrained_vit checkpoint (their value).
        text_encoder: "random-small", "random-base", a local BertModel directory, or a cached hub id (Med-KEBERT).
        text_fallback: random encoder built (with a warning) when ``text_encoder`` is not available locally; None
            raises an error saying what to download.
        text_hidden, text_layers, text_heads, text_intermediate: sizes of a random text encoder.
        text_pooling: "pooler" (KAD: pooler_output), "cls" (last hidden state of [CLS]) or "mean" (masked mean).
        freeze_text: freeze the text encoder and cache the C prompt embeddings (recomputed after load_state_dict).
        fusion_layers, fusion_heads, fusion_ffn, fusion_dim (default: ViT width), dropout: the fusion decoder.
        fusion_init_std: KAD's N(0, std) init of the fusion decoder and heads (0.02); None keeps PyTorch's default
            init, which trains a from-scratch model much faster (its near-zero chain of projections starts at a
            saddle: the demo preset's loss stayed at the label prior for two epochs with 0.02).
        aligner: "max_norm" (default), "conv", "sigmoid" or "projector" (a learned head on the fused per-class and
            per-patch features, ``ProjectorAligner``): how attention M becomes P in [0, 1].
        aligner_dim: the projector head's width k (None: min(fusion width, 256)); only used by "projector".
        classifier: "linear" (one Linear(d, 1) shared by all classes, as KAD) or "per_class" (one weight per class).
        return_probs: forward returns sigmoid probabilities (B, C) instead of the dict (for inference / Deploy).
    """

    def __init__(
        self,
        classes: Sequence[str] = DEFAULT_CLASSES,
        prompts: Sequence[str] | Mapping[str, str] | None = None,
        image_size: int = 128,
        patch_size: int = 16,
        in_channels: int = 1,
        vit_hidden: int = 192,
        vit_layers: int = 6,
        vit_heads: int = 3,
        vit_mlp: int = 768,
        vit_dropout: float = 0.0,
        vit_pretrained: str | None = None,
        vit_checkpoint: str | None = None,
        vit_norm_eps: float | None = None,
        text_encoder: str = "random-small",
        text_fallback: str | None = None,
        text_hidden: int | None = None,
        text_layers: int | None = None,
        text_heads: int | None = None,
        text_intermediate: int | None = None,
        text_pooling: str = "pooler",
        freeze_text: bool = True,
        fusion_layers: int = 1,
        fusion_heads: int = 4,
        fusion_ffn: int = 1024,
        fusion_dim: int | None = None,
        dropout: float = 0.1,
        fusion_init_std: float | None = 0.02,
        aligner: str = "max_norm",
        aligner_dim: int | None = None,
        classifier: str = "linear",
        return_probs: bool = False,
    ):
        super().__init__()
        self.classes = tuple(str(c) for c in classes)
        if not self.classes:
            raise ValueError("networks classes: at least one class is needed")
        self.prompts = _resolve_prompts(self.classes, prompts)
        if aligner not in ALIGNERS:
            raise ValueError(f"networks aligner={aligner!r}; choose one of {ALIGNERS}")
        if classifier not in CLASSIFIERS:
            raise ValueError(f"networks classifier={classifier!r}; choose one of {CLASSIFIERS}")
        if text_pooling not in POOLINGS:
            raise ValueError(f"networks text_pooling={text_pooling!r}; choose one of {POOLINGS}")
        if fusion_layers < 1:
            raise ValueError(f"networks fusion_layers={fusion_layers} must be >= 1")
        self.return_probs = bool(return_probs)
        self.text_pooling = text_pooling
        self.freeze_text = bool(freeze_text)
        num_classes = len(self.classes)

        # Image encoder: ViT patch tokens (CLS dropped) are the keys/values.
        if vit_pretrained and vit_checkpoint:
            raise ValueError(
                f"networks: vit_pretrained={vit_pretrained!r} and vit_checkpoint={vit_checkpoint!r} both given; "
                "set one of them (a ViTModel folder, or a weights file for the ViT built from the vit_* sizes)"
            )
        self.image_encoder = _build_vit(
            vit_pretrained, image_size, patch_size, in_channels, vit_hidden, vit_layers, vit_heads, vit_mlp, vit_dropout
        )
        # What a vit_checkpoint load did (file, prefix, naming, missing / ignored keys); None without one.
        self.vit_checkpoint_report = None
        if vit_checkpoint:
            self.vit_checkpoint_report = load_vit_checkpoint(self.image_encoder, vit_checkpoint, norm_eps=vit_norm_eps)
        elif vit_norm_eps is not None:
            _set_vit_norm_eps(self.image_encoder, vit_norm_eps)
        vcfg = self.image_encoder.config
        self.image_size, self.patch_size, self.in_channels = int(image_size), int(vcfg.patch_size), vcfg.num_channels
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={image_size} must be a multiple of the ViT patch size {self.patch_size}")
        self.grid = (self.image_size // self.patch_size, self.image_size // self.patch_size)
        img_dim = vcfg.hidden_size
        d = int(fusion_dim or img_dim)
        if d % fusion_heads:
            raise ValueError(f"fusion width {d} must be divisible by fusion_heads={fusion_heads}")
        self.fusion_dim = d

        # Text encoder and the fixed class prompts.
        self.tokenizer, self.text_encoder, self.text_source = build_text_encoder(
            text_encoder,
            self.prompts,
            text_hidden,
            text_layers,
            text_heads,
            text_intermediate,
            fallback=text_fallback,
            add_pooling_layer=text_pooling == "pooler",
        )
        max_len = int(getattr(self.text_encoder.config, "max_position_embeddings", 512))
        ids, mask = tokenize_prompts(
            self.tokenizer, self.prompts, max_length=max_len, check_unk=self.text_source.startswith("random-")
        )
        if not self.text_source.startswith("random-") and bool((ids == self.tokenizer.unk_token_id).any()):
            logger.warning("text encoder %s: some prompts contain [UNK] tokens: %s", self.text_source, self.prompts)
        self.register_buffer("prompt_ids", ids, persistent=False)
        self.register_buffer("prompt_mask", mask, persistent=False)
        txt_dim = self.text_encoder.config.hidden_size
        if self.freeze_text:
            self.text_encoder.requires_grad_(False)
            self.text_encoder.eval()
        self.register_buffer("prompt_cache", torch.zeros(num_classes, txt_dim), persistent=False)

        # KAD's projections to the fusion width, then a LayerNorm on both decoder inputs (no positional encodings).
        self.image_proj = nn.Linear(img_dim, d) if img_dim != d else nn.Identity()
        self.text_proj = nn.Sequential(nn.Linear(txt_dim, d), nn.GELU(), nn.Linear(d, d))
        self.memory_norm = nn.LayerNorm(d)
        self.query_norm = nn.LayerNorm(d)
        self.layers = nn.ModuleList(
            [FusionDecoderLayer(d, fusion_heads, fusion_ffn, dropout) for _ in range(fusion_layers)]
        )
        self.decoder_norm = nn.LayerNorm(d)
        self.head_dropout = nn.Dropout(dropout)
        if classifier == "linear":
            self.classifier = nn.Linear(d, 1)
        else:
            self.classifier = nn.Linear(d, num_classes)  # row c scores class c's feature (diagonal is used)
        self.classifier_type = classifier
        fusion = nn.ModuleList(
            [self.image_proj, self.text_proj, self.memory_norm, self.query_norm, self.layers, self.decoder_norm]
        )
        if fusion_init_std is not None:  # KAD: N(0, 0.02). None keeps PyTorch's default (Xavier/Kaiming) init.
            _init_normal(fusion, fusion_init_std)
            _init_normal(self.classifier, fusion_init_std)
        self.aligner_type = aligner
        self.aligner_dim = None
        if aligner == "max_norm":
            self.aligner = MaxNormAligner()
        elif aligner == "conv":
            self.aligner = ConvAligner()
        elif aligner == "projector":
            self.aligner = ProjectorAligner(d, aligner_dim)
            self.aligner_dim = self.aligner.proj_dim
            if fusion_init_std is not None:  # the fused features' other head (the classifier) gets the same init
                _init_normal(self.aligner, fusion_init_std)
                self.aligner.reset_last()
        else:
            self.aligner = SigmoidAligner(num_classes)

        self.refresh_prompt_cache()
        # Cached prompt embeddings depend on the text-encoder weights: recompute them whenever weights are loaded.
        self.register_load_state_dict_post_hook(_refresh_after_load)

    # ----------------------------------------------------------------------------------------------- text side
    def _text_weights_version(self) -> int:
        """Sum of the text encoder's tensor version counters: any in-place change of its weights (load_state_dict
        on the encoder itself, ``p.copy_``) raises it, ``.to()`` gives new tensors; cheap (~40 ints per forward)."""
        return sum(t._version for t in (*self.text_encoder.parameters(), *self.text_encoder.buffers()))

    def refresh_prompt_cache(self) -> None:
        """Recompute the cached prompt embeddings (at construction, after every load_state_dict of the network, and
        when the frozen text encoder's weights changed since the last computation: :meth:`prompt_embeddings`)."""
        with torch.autocast(self.prompt_ids.device.type, enabled=False):  # full precision even inside an AMP step
            feats = encode_prompts(self.text_encoder, self.prompt_ids, self.prompt_mask, self.text_pooling)
        self.prompt_cache = feats.to(self.prompt_cache.dtype)
        self._prompt_cache_version = self._text_weights_version()

    def prompt_embeddings(self) -> torch.Tensor:
        """(C, D_txt) prompt features: the cache when frozen, a fresh (differentiable) pass otherwise.

        A frozen encoder always runs in eval mode (no dropout) and gets no gradient, so its C prompt features are
        constants: computed once instead of one BERT pass per step (docs/performance.md), and recomputed when its
        weights change (the version check is skipped while torch.compile traces: its graph keeps the buffer)."""
        if self.freeze_text:
            compiling = torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()
            if not compiling and getattr(self, "_prompt_cache_version", None) != self._text_weights_version():
                self.refresh_prompt_cache()
            return self.prompt_cache
        out = self.text_encoder(input_ids=self.prompt_ids, attention_mask=self.prompt_mask)
        return pool_text(out, self.prompt_mask, self.text_pooling)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_text:
            self.text_encoder.eval()  # a frozen encoder never runs dropout
        return self

    # ------------------------------------------------------------------------------------------------- forward
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, S, S) -> patch tokens (B, N, D_img), CLS dropped."""
        if image.ndim != 4:
            raise ValueError(f"AlignerVLM expects images (B, {self.in_channels}, H, W), got shape {tuple(image.shape)}")
        size = tuple(image.shape[-2:])
        if torch.jit.is_tracing() and size != (self.image_size, self.image_size):
            # a traced graph keeps the example's size (interpolated position embeddings baked in): refuse a wrong one
            raise ValueError(
                f"tracing AlignerVLM on {size[0]} x {size[1]} images, but it was trained at image_size="
                f"{self.image_size}: trace with input_shape [1, {self.in_channels}, {self.image_size}, "
                f"{self.image_size}] (ckpt_export --input_shape; models/model.json has the size)"
            )
        vcfg = self.image_encoder.config
        interpolate = size != (vcfg.image_size, vcfg.image_size)
        out = self.image_encoder(pixel_values=image, interpolate_pos_encoding=interpolate)
        return out.last_hidden_state[:, 1:]

    def forward_features(self, image: torch.Tensor, classes=None) -> dict[str, torch.Tensor]:
        """The output dict; ``classes`` (class indices, e.g. ``[1]``): query only those prompts (the class-subset
        forward of the sequential class schedule), and every output has their classes only, in that order."""
        b, _, hh, ww = image.shape
        if classes is not None:
            classes = torch.as_tensor(classes, dtype=torch.long, device=image.device).reshape(-1)
        if hh % self.patch_size or ww % self.patch_size:
            raise ValueError(f"image size {(hh, ww)} must be a multiple of the patch size {self.patch_size}")
        gh, gw = hh // self.patch_size, ww // self.patch_size
        memory = self.memory_norm(self.image_proj(self.encode_image(image)))
        queries = self.query_norm(self.text_proj(self.prompt_embeddings().to(memory.dtype)))
        if classes is not None:
            queries = queries[classes]
        x = queries.unsqueeze(0).expand(b, -1, -1)
        attn = None
        for i, layer in enumerate(self.layers):
            x, w = layer(x, memory, need_weights=i == len(self.layers) - 1)
            attn = w if w is not None else attn
        fused = self.decoder_norm(x)  # (B, C, d): the per-class fused features both heads read
        feats = self.head_dropout(fused)
        if self.classifier_type == "linear":
            logits = self.classifier(feats).squeeze(-1)
        else:
            weight, bias = self.classifier.weight, self.classifier.bias
            if classes is not None:
                weight, bias = weight[classes], bias[classes]
            logits = (feats * weight.unsqueeze(0)).sum(-1) + bias
        attn = attn.reshape(b, -1, gh, gw)
        if self.aligner_type == "projector":
            refined = self.aligner(attn, fused, memory)
        elif self.aligner_type == "sigmoid":
            refined = self.aligner(attn, classes)
        else:
            refined = self.aligner(attn)
        return {"logits": logits, "attn": attn, "attn_refined": refined}

    def forward(self, image: torch.Tensor, classes=None):
        out = self.forward_features(image, classes)
        return torch.sigmoid(out["logits"]) if self.return_probs else out

    @torch.no_grad()
    def predict_with_attention(self, image: torch.Tensor, refined: bool = False, size=None) -> dict[str, torch.Tensor]:
        """Inference helper: ``{"probs": (B, C), "attn": (B, C, H, W)}`` with maps upsampled to the image size
        (or ``size``); ``refined`` selects the aligner output instead of the raw attention."""
        out = self.forward_features(image)
        maps = out["attn_refined" if refined else "attn"]
        return {"probs": torch.sigmoid(out["logits"]), "attn": upsample_attention(maps, size or image.shape[-2:])}


class AlignerVLMInference(AlignerVLM):
    """AlignerVLM whose forward returns sigmoid probabilities (B, C): a tensor for ``verify_net_in_out``/Deploy.

    Same constructor arguments and the same state_dict keys as AlignerVLM, so ``models/model.pt`` trained with
    AlignerVLM loads into it directly (``strict=True``).
    """

    def __init__(self, *args, **kwargs):
        kwargs["return_probs"] = True
        super().__init__(*args, **kwargs)


def upsample_attention(attn: torch.Tensor, size, mode: str = "bilinear") -> torch.Tensor:
    """(B, C, h, w) maps -> (B, C, H, W) by bilinear interpolation (align_corners=False, as in the loss).

    The values are interpolated, not renormalised: a softmax map no longer sums to 1 after upsampling.
    """
    size = tuple(int(s) for s in size)
    if tuple(attn.shape[-2:]) == size:
        return attn
    return F.interpolate(attn, size=size, mode=mode, align_corners=False if mode in ("bilinear", "bicubic") else None)


def build_aligner_vlm(preset: str = "demo", inference: bool = False, **overrides) -> AlignerVLM:
    """AlignerVLM (or AlignerVLMInference) from a named preset ("demo" | "paper") with keyword overrides."""
    if preset not in PRESETS:
        raise ValueError(f"networks preset={preset!r}; choose one of {sorted(PRESETS)}")
    kwargs = copy.deepcopy(PRESETS[preset])
    kwargs.update(overrides)
    return (AlignerVLMInference if inference else AlignerVLM)(**kwargs)


# ------------------------------------------------------------------------------------ architecture with the weights
# models/model.pt stays a plain state_dict (the MONAI bundle spec); the architecture it was trained with is recorded
# beside it in a JSON sidecar (models/model.json), written by BestModelSaver at the same moment. Inference,
# evaluation, export and Deploy rebuild the network from it (build_from_checkpoint) instead of command-line flags.
CONFIG_FORMAT = "bundle.networks.AlignerVLM/1"
# The sizes named in error messages (the ones a user would otherwise repeat on the command line).
SIZE_KEYS = (
    "image_size",
    "patch_size",
    "in_channels",
    "vit_hidden",
    "vit_layers",
    "vit_heads",
    "vit_mlp",
    "text_encoder",
    "text_hidden",
    "text_layers",
    "text_heads",
    "text_intermediate",
    "text_pooling",
    "fusion_layers",
    "fusion_dim",
    "fusion_heads",
    "fusion_ffn",
    "aligner",
    "aligner_dim",
    "classifier",
    "classes",
)
_BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CheckpointConfigError(RuntimeError):
    """A checkpoint and its architecture sidecar (or the network it is loaded into) do not go together.

    A RuntimeError, as ``load_state_dict``'s own size-mismatch error, so callers that caught that still catch it.
    """


def network_config(net: nn.Module) -> dict:
    """The AlignerVLM constructor kwargs that rebuild ``net``'s architecture (read from the built modules).

    ``return_probs`` is left out (``build_from_checkpoint(inference=...)`` chooses it). A pretrained ViT is recorded
    by its sizes and LayerNorm eps (``vit_pretrained=None``, ``vit_checkpoint=None``): its weights are in the
    state_dict. A random text encoder (also one built
    as a fallback) is recorded as ``random-small`` / ``random-base`` with its sizes, so it is rebuilt offline; a local
    folder or a cached hub id is kept as given (it is needed for the tokenizer; nothing is ever downloaded).
    """
    net = getattr(net, "module", net)  # DDP / DataParallel
    if not isinstance(net, AlignerVLM):
        raise TypeError(f"network_config needs an AlignerVLM, got {type(net).__name__}")
    vcfg, tcfg = net.image_encoder.config, net.text_encoder.config
    layer = net.layers[0]
    source = str(net.text_source)
    if source.startswith("random-"):
        text_encoder = source.split(" ", 1)[0]
        text = {
            "text_hidden": int(tcfg.hidden_size),
            "text_layers": int(tcfg.num_hidden_layers),
            "text_heads": int(tcfg.num_attention_heads),
            "text_intermediate": int(tcfg.intermediate_size),
        }
    else:
        text_encoder, text = source, {"text_hidden": None, "text_layers": None, "text_heads": None}
        text["text_intermediate"] = None
    return {
        "classes": list(net.classes),
        "prompts": list(net.prompts),
        "image_size": int(net.image_size),
        "patch_size": int(net.patch_size),
        "in_channels": int(net.in_channels),
        "vit_hidden": int(vcfg.hidden_size),
        "vit_layers": int(vcfg.num_hidden_layers),
        "vit_heads": int(vcfg.num_attention_heads),
        "vit_mlp": int(vcfg.intermediate_size),
        "vit_dropout": float(vcfg.hidden_dropout_prob),
        "vit_pretrained": None,
        "vit_checkpoint": None,  # a loaded checkpoint's weights are in the state_dict
        "vit_norm_eps": float(vcfg.layer_norm_eps),
        "text_encoder": text_encoder,
        "text_fallback": None,
        **text,
        "text_pooling": net.text_pooling,
        "freeze_text": bool(net.freeze_text),
        "fusion_layers": len(net.layers),
        "fusion_heads": int(layer.cross_attn.num_heads),
        "fusion_ffn": int(layer.ffn[0].out_features),
        "fusion_dim": int(net.fusion_dim),
        "dropout": float(layer.drop1.p),
        "fusion_init_std": None,  # the initialisation does not matter once the trained weights are loaded
        "aligner": net.aligner_type,
        "aligner_dim": net.aligner_dim,
        "classifier": net.classifier_type,
    }


def config_path_for(ckpt_path: str | os.PathLike) -> str:
    """The architecture sidecar of a checkpoint: ``models/model.pt`` -> ``models/model.json``."""
    return os.path.splitext(os.fspath(ckpt_path))[0] + ".json"


def bundle_version() -> str:
    meta = read_json(os.path.join(_BUNDLE_ROOT, "configs", "metadata.json")) or {}
    return str(meta.get("version", "unknown"))


def write_network_config(ckpt_path: str | os.PathLike, net: nn.Module, config_path: str | None = None) -> str:
    """Write the sidecar of the (already written) checkpoint ``ckpt_path`` atomically; returns its path.

    Contents: ``format``, ``network`` (the class), ``kwargs`` (network_config), ``bundle_version``, ``model_file``
    and ``model_sha256`` (so that a sidecar left beside a replaced model.pt is detected), torch/transformers versions.
    """
    import transformers

    path = config_path or config_path_for(ckpt_path)
    record = {
        "format": CONFIG_FORMAT,
        "network": "bundle.networks.AlignerVLM",
        "kwargs": network_config(net),
        "bundle_version": bundle_version(),
        "model_file": os.path.basename(os.fspath(ckpt_path)),
        "model_sha256": file_sha256(ckpt_path),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    return write_json_atomic(path, record)


def _fix_hint(ckpt_path: str) -> str:
    return (
        "retrain (BestModelSaver writes both files), or write the sidecar for this checkpoint from the config it was "
        f"trained with: python scripts/export.py --ckpt_file {ckpt_path} --write_config --config_file "
        "configs/train.yaml [--image_size S --network_def#vit_layers L ...]"
    )


def read_network_config(ckpt_path: str | os.PathLike, check: bool = True) -> dict | None:
    """The sidecar of ``ckpt_path`` (dict), or None when there is none. With ``check``, raise
    CheckpointConfigError when it is unreadable, of another format, or was written for other weights (sha256)."""
    ckpt_path = os.fspath(ckpt_path)
    path = config_path_for(ckpt_path)
    if not os.path.exists(path):
        return None
    record = read_json(path)
    if not isinstance(record, dict) or record.get("format") != CONFIG_FORMAT or "kwargs" not in record:
        raise CheckpointConfigError(
            f"{path} is not an architecture sidecar of format {CONFIG_FORMAT!r}: delete it or {_fix_hint(ckpt_path)}"
        )
    if check and os.path.isfile(ckpt_path) and record.get("model_sha256") != file_sha256(ckpt_path):
        raise CheckpointConfigError(
            f"{path} is stale: it was written for another {record.get('model_file', 'model.pt')} (sha256 "
            f"{str(record.get('model_sha256'))[:12]}... != {file_sha256(ckpt_path)[:12]}... of {ckpt_path}). "
            f"Copy the two files together; or delete it and {_fix_hint(ckpt_path)}"
        )
    return record


def describe_sizes(kwargs: Mapping, keys: Sequence[str] | None = None) -> str:
    """``"image_size=128, vit_layers=6"``: the SIZE_KEYS of ``kwargs`` (or ``keys``) that it has."""
    keys = SIZE_KEYS if keys is None else keys
    return ", ".join(f"{k}={kwargs[k]}" for k in keys if k in kwargs)


def config_differences(trained: Mapping, built: Mapping) -> list[str]:
    """The SIZE_KEYS whose values differ between two kwargs dicts (missing keys are skipped)."""
    diff = []
    for k in SIZE_KEYS:
        if k in trained and k in built:
            a, b = trained[k], built[k]
            if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
                a, b = list(a or []), list(b or [])
            if a != b:
                diff.append(k)
    return diff


def _state_dict_of(ckpt_path: str) -> dict:
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):  # a CheckpointSaver dict
        state = state["model"]
    return state


def infer_sizes(state: Mapping[str, torch.Tensor]) -> dict:
    """Sizes that can be read off an AlignerVLM state_dict's shapes (no heads): for error messages."""
    out: dict = {}
    proj = state.get("image_encoder.embeddings.patch_embeddings.projection.weight")
    pos = state.get("image_encoder.embeddings.position_embeddings")
    if proj is not None:
        out["patch_size"], out["in_channels"], out["vit_hidden"] = (
            int(proj.shape[-1]),
            int(proj.shape[1]),
            int(proj.shape[0]),
        )
        if pos is not None:
            side = int(round(math.sqrt(pos.shape[1] - 1)))
            out["image_size"] = side * out["patch_size"]

    def count(prefix: str) -> int:
        return len({k[len(prefix) :].split(".", 1)[0] for k in state if k.startswith(prefix)})

    # transformers 5 names the ViT blocks image_encoder.layers.<i> (mlp.fc1); older ones encoder.layer.<i>
    out["vit_layers"] = count("image_encoder.layers.") or count("image_encoder.encoder.layer.")
    mlp = state.get(
        "image_encoder.layers.0.mlp.fc1.weight", state.get("image_encoder.encoder.layer.0.intermediate.dense.weight")
    )
    if mlp is not None:
        out["vit_mlp"] = int(mlp.shape[0])
    word = state.get("text_encoder.embeddings.word_embeddings.weight")
    if word is not None:
        out["text_hidden"] = int(word.shape[1])
    out["text_layers"] = count("text_encoder.encoder.layer.")
    inter = state.get("text_encoder.encoder.layer.0.intermediate.dense.weight")
    if inter is not None:
        out["text_intermediate"] = int(inter.shape[0])
    out["fusion_layers"] = count("layers.")
    norm = state.get("decoder_norm.weight")
    if norm is not None:
        out["fusion_dim"] = int(norm.shape[0])
    ffn = state.get("layers.0.ffn.0.weight")
    if ffn is not None:
        out["fusion_ffn"] = int(ffn.shape[0])
    return {k: v for k, v in out.items() if v}


def mismatch_message(ckpt_path: str, net: nn.Module, error: BaseException, state: Mapping | None = None) -> str:
    """Why ``ckpt_path`` does not load into ``net``, naming the sizes it was trained with and the fix."""
    ckpt_path = os.fspath(ckpt_path)
    sidecar = config_path_for(ckpt_path)
    detail = " ".join(line.strip() for line in str(error).splitlines()[1:3])[:300]
    try:
        built = network_config(net)
    except TypeError:
        built = {}
    try:
        record = read_network_config(ckpt_path, check=False)
    except CheckpointConfigError:
        record = None
    if record is not None:
        trained, where = record["kwargs"], sidecar
        diff = config_differences(trained, built) if built else []
    else:
        trained, where = (infer_sizes(state) if state is not None else {}), "its tensor shapes (no sidecar)"
        diff = config_differences(trained, built) if built else []
    if diff:
        sizes = (
            f": {ckpt_path} was trained with {describe_sizes(trained, diff)} (from {where}); this network has "
            f"{describe_sizes(built, diff)}"
        )
        flags = " ".join(f"--network_def#{k} {trained[k]}" for k in diff if k not in ("classes", "image_size"))
        flags = (f"--image_size {trained['image_size']} " if "image_size" in diff else "") + flags
    else:
        sizes, flags = "", "--image_size S --network_def#vit_layers L ..."
    fix = (
        "build the network from the checkpoint (network_def: _target_: bundle.networks.build_from_checkpoint, "
        f"ckpt_path: ...), or pass the sizes it was trained with ({flags.strip()})"
    )
    return f"{ckpt_path} does not fit the network{sizes}. Fix: {fix}. ({detail})"


def build_from_checkpoint(
    ckpt_path: str | os.PathLike,
    inference: bool = False,
    device: str | torch.device | None = None,
    load_weights: bool = True,
    **fallback,
) -> AlignerVLM:
    """The network ``ckpt_path`` (a plain state_dict) was trained as, with its weights, in eval mode.

    The architecture comes from the sidecar (``config_path_for(ckpt_path)``, written by BestModelSaver). ``fallback``
    are AlignerVLM kwargs (a config's network_def sizes) used, with a log line, when there is no checkpoint yet
    (the untrained demo network: ``verify_net_in_out``) or a checkpoint without sidecar (trained before sidecars
    existed). Raises CheckpointConfigError naming the files and the fix when the sidecar is stale or missing (and no
    fallback is given) or the weights do not fit; FileNotFoundError when there is neither checkpoint nor fallback.
    ``inference``: an AlignerVLMInference (forward returns probabilities (B, C)).
    """
    ckpt_path = os.fspath(ckpt_path)
    fallback.pop("return_probs", None)
    cls = AlignerVLMInference if inference else AlignerVLM
    if not os.path.isfile(ckpt_path):
        if not fallback:
            raise FileNotFoundError(
                f"checkpoint {ckpt_path!r} not found: train first (python -m monai.bundle run training "
                "--config_file configs/train.yaml) or pass --ckpt_path /path/to/model.pt"
            )
        logger.info(
            "no checkpoint at %s: building the config's network (%s), untrained", ckpt_path, describe_sizes(fallback)
        )
        net = cls(**fallback)
        return net.to(device) if device is not None else net
    record = read_network_config(ckpt_path, check=True)
    if record is not None:
        kwargs = dict(record["kwargs"])
        kwargs.pop("return_probs", None)
        diff = config_differences(kwargs, fallback) if fallback else []
        if diff:
            logger.info(
                "%s: building the network it was trained with (%s, from %s); the config's %s are not used",
                ckpt_path,
                describe_sizes(kwargs, diff),
                config_path_for(ckpt_path),
                describe_sizes(fallback, diff),
            )
    elif fallback:
        logger.warning(
            "%s has no architecture sidecar %s: building the config's network (%s); %s",
            ckpt_path,
            config_path_for(ckpt_path),
            describe_sizes(fallback),
            "retrain or write the sidecar (python scripts/export.py --write_config) to stop depending on flags",
        )
        kwargs = dict(fallback)
    else:
        raise CheckpointConfigError(
            f"{ckpt_path} has no architecture sidecar {config_path_for(ckpt_path)}, so the network it was trained as "
            f"is unknown: {_fix_hint(ckpt_path)}"
        )
    net = cls(**kwargs)
    if load_weights:
        state = _state_dict_of(ckpt_path)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise CheckpointConfigError(mismatch_message(ckpt_path, net, e, state)) from None
    net = net.eval()
    return net.to(device) if device is not None else net


def checkpoint_setting(ckpt_path: str | os.PathLike, key: str, default=None):
    """The constructor argument ``key`` (e.g. "image_size", "classes") ``ckpt_path`` was trained with (its sidecar),
    else ``default`` (with a log line). For the config values that must follow the model, e.g. inference.yaml's
    ``image_size: "$bundle.networks.checkpoint_setting(@ckpt_path, 'image_size', 96)"``."""
    ckpt_path = os.fspath(ckpt_path)
    record = read_network_config(ckpt_path, check=False) if os.path.isfile(ckpt_path) else None
    if record is not None and key in record["kwargs"]:
        return record["kwargs"][key]
    if default is None:
        raise CheckpointConfigError(f"{ckpt_path}: no architecture sidecar to read {key!r} from; pass it")
    logger.info("%s: no architecture sidecar, %s=%s from the config", ckpt_path, key, default)
    return default


def checkpoint_image_size(ckpt_path: str | os.PathLike, default: int | None = None) -> int:
    """The image size ``ckpt_path`` was trained at (its sidecar), else ``default``: the preprocessing size of the
    inference/evaluation configs (``image_size: "$bundle.networks.checkpoint_image_size(@ckpt_path, 96)"``)."""
    return int(checkpoint_setting(ckpt_path, "image_size", default))
