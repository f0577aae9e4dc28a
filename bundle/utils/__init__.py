"""Infrastructure shared by every part of the bundle (one copy of each):

- :mod:`bundle.utils.atomic`: atomic writes of text, JSON, CSV, torch checkpoints and figures;
- :mod:`bundle.utils.lock`: the file lock (released by the kernel when its holder dies);
- :mod:`bundle.utils.dist`: the rank of this process, unwrapping DDP modules;
- :mod:`bundle.utils.mlflow`: server reachability, key sanitising, flat params;
- :mod:`bundle.utils.dicom`: the DICOM factory used by the synthetic generator, the benchmarks and the tests.
"""
