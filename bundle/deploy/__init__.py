"""MONAI Deploy App SDK 4.0 application: a DICOM study folder -> per-finding probabilities (DICOM SR) and an
attention-heatmap overlay (DICOM Secondary Capture) for every frontal chest radiograph in it.

Run it as ``python -m bundle.deploy -i STUDY_DIR -o OUT -m models/model.pt`` (docs/deploy.md). Nothing is imported
here: the SDK (holoscan) takes seconds to import, and ``bundle`` must stay importable without it.
"""
