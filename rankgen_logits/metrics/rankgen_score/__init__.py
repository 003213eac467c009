"""The ``rankgen_score`` evaluate module (load it with ``evaluate.load(rankgen_logits.metrics.path("rankgen_score"))``)."""
