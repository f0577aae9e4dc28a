"""Model inputs -> per-finding probabilities and attention maps (the network's ``predict_with_attention``).

Written because the SDK's MonaiBundleInferenceOperator keeps only the network's tensor output (the probabilities),
while the overlay also needs the attention maps of ``forward_features``.
"""

from __future__ import annotations

import logging

import torch
from monai.deploy.core import Fragment, Operator, OperatorSpec

from bundle.deploy.model import load_network

logger = logging.getLogger(__name__)


class CXRInferenceOperator(Operator):
    """Input ``images`` (CXRLoaderOperator); output ``results``: the same dicts plus ``probs`` (C,) and ``attn``
    (C, S, S) numpy arrays (attention upsampled to the letterboxed input), and ``classes``."""

    def __init__(self, fragment: Fragment, *args, spec, parser, batch_size: int = 8, **kwargs):
        self.net = load_network(spec, parser)
        self.classes = [str(c) for c in parser.get_parsed_content("classes")]
        self.batch_size = int(batch_size)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("images")
        spec.output("results")

    def compute(self, op_input, op_output, context):
        images = op_input.receive("images") or []
        results = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            batch = torch.stack([torch.as_tensor(item["image"]).float() for item in chunk])
            with torch.no_grad():
                out = self.net.predict_with_attention(batch)
            for i, item in enumerate(chunk):
                probs = out["probs"][i].numpy()
                results.append({**item, "probs": probs, "attn": out["attn"][i].numpy(), "classes": self.classes})
                summary = ", ".join(f"{c} {p:.3f}" for c, p in zip(self.classes, probs, strict=True))
                logger.info(f"{item['path']}: {summary}")
        op_output.emit(results, "results")
