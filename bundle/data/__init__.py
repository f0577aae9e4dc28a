"""Data: the datalist format every dataset is read through, and what produces datalists.

:mod:`bundle.data.datalist` is the format (schema and validation, load / save, summary);
:mod:`bundle.data.converters` turns public chest X-ray datasets, as downloaded, into datalists (one module per
dataset, a registry of their command-line options, composition of several); :mod:`bundle.data.synthetic` is the
built-in synthetic benchmark (plan, render, write, stats); :mod:`bundle.data.splits` is the seeded patient-level
split they all use. Sex and age rules are :mod:`bundle.demographics`'.
"""
