"""The ``continuation_accuracy`` evaluate module (``evaluate.load(rankgen_logits.metrics.path("continuation_accuracy"))``)."""
