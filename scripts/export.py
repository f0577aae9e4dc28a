#!/usr/bin/env python
"""models/model.pt + models/model.json -> models/model.ts (TorchScript, traced) + models/model.onnx (dynamic batch).

    python scripts/export.py                          # both files, each checked against eager at batch 1 and 4
    python scripts/export.py --no_onnx                # TorchScript only
    python scripts/export.py --write_config --image_size 128 --network_def#vit_layers 6
                                                      # sidecar for a checkpoint trained before sidecars existed

See docs/export.md (bundle/export.py does the work).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bundle.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
