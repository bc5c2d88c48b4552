"""Bulk scoring of image archives: input discovery, the engine run (local or Ray), resumable chunked output.

Entry point: :func:`patchflannel.scoring.run.score` (``ray=`` for a Ray cluster; kept out of this ``__init__``
so that importing the output writers does not import torch).
"""
