"""Evaluation of a policy on labelled images, in one place.

- :mod:`.manifest`: the labelled-image manifests (``path,label,attack_type,domain,split``);
- :mod:`.metrics`: AUC, EER, HTER, APCER/BPCER/ACER with bootstrap intervals (scikit-learn);
- :mod:`.protocols`: which images fix the threshold and which are tested (files, or one manifest);
- :mod:`.scoring`: investigating every image with an agent variant, and the scores CSV;
- :mod:`.analyses`: the runner (thresholds, folds) and the paper's analyses;
- :mod:`.report`: tables and the written report.

``tarfas eval MANIFEST`` is a one-fold protocol (:func:`.protocols.manifest_protocol`) through the same
runner (:func:`.analyses.run_evaluation`) as a protocol file.
"""
