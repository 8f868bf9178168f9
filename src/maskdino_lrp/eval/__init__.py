"""Explanation-quality evaluation, one job per module.

methods (explanation methods behind one interface) · drise (the D-RISE black-box baseline) ·
metrics (metric definitions, replacements, the detector's score) · matching (which detections are
explained) · curves (batched MIF / insertion / LIF curves) · per_image (one image's pairs, methods and
curves) · parts (the resumable per-image store) · stats (means, paired comparisons, rank stability) ·
report (tables, CSVs, plots, summary) · settings (the metric registry and run settings) · run
(:func:`~maskdino_lrp.eval.run.evaluate`) · args (the command line).
"""
