"""RankGen score: how well continuations fit their prefixes, by a RankGen scorer (higher is better)."""

import datasets
import evaluate

from rankgen_logits.metrics import resolve_scorer, score_pairs

_DESCRIPTION = """\
The RankGen score of a continuation given its prefix is the dot product of the scorer's prefix and continuation
embeddings (Krishna et al., 2022). This module returns the mean over the inputs and every individual score. The scorer
is passed at compute time: an object with `score(prefixes, continuations)` (or `encode_prefix`/`encode_suffix`),
such as `rankgen_logits.RankGenScorer`, or a local checkpoint folder. Nothing is downloaded unless you name a Hub id.
"""

_KWARGS_DESCRIPTION = """
Args:
    prefixes (`list` of `str`): the prefixes (prompts).
    continuations (`list` of `str`): one continuation per prefix.
    scorer: a scorer object, or a checkpoint folder (RankGenScorer, official or saved by rankgen_logits; or a
        PooledEncoderScorer folder).
    scorer_tokenizer (optional): tokenizer for a checkpoint folder that ships none (official RankGen checkpoints).
    batch_size (`int`, defaults to 32): texts per scorer call.
Returns:
    rankgen_score (`float`): the mean score.
    scores (`list` of `float`): the score of each continuation.
Examples:
    >>> import evaluate
    >>> from rankgen_logits import metrics
    >>> module = evaluate.load(metrics.path("rankgen_score"))  # doctest: +SKIP
    >>> module.compute(prefixes=["The cat"], continuations=["sat on the mat."], scorer="path/to/scorer")  # doctest: +SKIP
    {'rankgen_score': 12.3, 'scores': [12.3]}
"""

_CITATION = """\
@inproceedings{krishna2022rankgen,
  title={RankGen: Improving Text Generation with Large Ranking Models},
  author={Krishna, Kalpesh and Chang, Yapei and Wieting, John and Iyyer, Mohit},
  booktitle={EMNLP},
  year={2022}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RankgenScore(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"prefixes": datasets.Value("string"), "continuations": datasets.Value("string")}
            ),
            reference_urls=["https://arxiv.org/abs/2205.09726"],
        )

    def _compute(self, prefixes, continuations, scorer=None, scorer_tokenizer=None, batch_size=32):
        scores = score_pairs(resolve_scorer(scorer, scorer_tokenizer), prefixes, continuations, batch_size)
        if not len(scores):
            raise ValueError("rankgen_score got no inputs: pass at least one prefix and continuation.")
        return {"rankgen_score": float(scores.mean()), "scores": scores.tolist()}
