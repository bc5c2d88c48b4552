"""Bulk scoring of image archives: input discovery, the engine run (local or Ray), resumable chunked output.

Entry points: :func:`patchflannel.scoring.run.score` and :func:`patchflannel.scoring.ray_runner.score_on_ray`
(kept out of this ``__init__`` so that importing the output writers does not import torch).
"""
