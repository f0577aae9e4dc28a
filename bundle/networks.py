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
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ViTConfig, ViTModel

from bundle.text import build_text_encoder, encode_prompts, pool_text, tokenize_prompts

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
}

PRESETS = {"demo": DEMO_PRESET, "paper": PAPER_PRESET}

ALIGNERS = ("max_norm", "conv", "sigmoid")
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

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        n = m.shape[-2] * m.shape[-1]
        z = torch.log(m.clamp_min(self.eps) * n)
        return torch.sigmoid(self.weight.view(1, -1, 1, 1) * z + self.bias.view(1, -1, 1, 1))


class MaxNormAligner(nn.Module):
    """P = M / max over patches (parameter-free): L_AL can only be lowered by moving the attention itself."""

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        return m / m.amax(dim=(-2, -1), keepdim=True).clamp_min(self.eps)


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


def _build_vit(vit_pretrained, image_size, patch_size, in_channels, hidden, layers, heads, mlp, dropout) -> ViTModel:
    if vit_pretrained:
        try:
            vit = ViTModel.from_pretrained(str(vit_pretrained), local_files_only=True, add_pooling_layer=False)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(
                f"vit_pretrained={vit_pretrained!r} could not be loaded offline ({type(e).__name__}: {e}). Pass a "
                "directory written by ViTModel.save_pretrained (config.json + weights), e.g. from `hf download "
                "google/vit-base-patch16-224-in21k --local-dir models/vit-b16`, or a hub id already in the HF cache; "
                "or vit_pretrained=None for a randomly initialised ViT."
            ) from e
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
        aligner: "max_norm" (default), "conv" or "sigmoid": how attention M becomes P in [0, 1].
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
        self.image_encoder = _build_vit(
            vit_pretrained, image_size, patch_size, in_channels, vit_hidden, vit_layers, vit_heads, vit_mlp, vit_dropout
        )
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
        if aligner == "max_norm":
            self.aligner = MaxNormAligner()
        elif aligner == "conv":
            self.aligner = ConvAligner()
        else:
            self.aligner = SigmoidAligner(num_classes)

        self.refresh_prompt_cache()
        # Cached prompt embeddings depend on the text-encoder weights: recompute them whenever weights are loaded.
        self.register_load_state_dict_post_hook(_refresh_after_load)

    # ----------------------------------------------------------------------------------------------- text side
    def refresh_prompt_cache(self) -> None:
        """Recompute the cached prompt embeddings (called at construction and after every load_state_dict)."""
        feats = encode_prompts(self.text_encoder, self.prompt_ids, self.prompt_mask, self.text_pooling)
        self.prompt_cache = feats.to(self.prompt_cache.dtype)

    def prompt_embeddings(self) -> torch.Tensor:
        """(C, D_txt) prompt features: the cache when frozen, a fresh (differentiable) pass otherwise."""
        if self.freeze_text:
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
        vcfg = self.image_encoder.config
        interpolate = size != (vcfg.image_size, vcfg.image_size)
        out = self.image_encoder(pixel_values=image, interpolate_pos_encoding=interpolate)
        return out.last_hidden_state[:, 1:]

    def forward_features(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        b, _, hh, ww = image.shape
        if hh % self.patch_size or ww % self.patch_size:
            raise ValueError(f"image size {(hh, ww)} must be a multiple of the patch size {self.patch_size}")
        gh, gw = hh // self.patch_size, ww // self.patch_size
        memory = self.memory_norm(self.image_proj(self.encode_image(image)))
        queries = self.query_norm(self.text_proj(self.prompt_embeddings().to(memory.dtype)))
        x = queries.unsqueeze(0).expand(b, -1, -1)
        attn = None
        for i, layer in enumerate(self.layers):
            x, w = layer(x, memory, need_weights=i == len(self.layers) - 1)
            attn = w if w is not None else attn
        feats = self.head_dropout(self.decoder_norm(x))  # (B, C, d)
        if self.classifier_type == "linear":
            logits = self.classifier(feats).squeeze(-1)
        else:
            logits = (feats * self.classifier.weight.unsqueeze(0)).sum(-1) + self.classifier.bias
        attn = attn.reshape(b, -1, gh, gw)
        return {"logits": logits, "attn": attn, "attn_refined": self.aligner(attn)}

    def forward(self, image: torch.Tensor):
        out = self.forward_features(image)
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
