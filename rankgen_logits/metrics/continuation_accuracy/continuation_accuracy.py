"""Continuation identification accuracy: does the scorer rank the gold continuation above its negatives?"""

import datasets
import evaluate

from rankgen_logits.metrics import identification_accuracy, resolve_scorer

_DESCRIPTION = """\
For each prefix, a scorer scores its gold continuation and its negatives: other spans of the same document
(in-document negatives) or continuations sampled from a language model for the same prefix (generated negatives).
`accuracy` is the share of prefixes whose gold scores strictly above all of its negatives (a (1+k)-way choice; the
paper's continuation-identification accuracy, Tables 1 and 2, uses one negative, k=1); `pairwise_accuracy` counts
every gold-negative pair. Chance levels are returned alongside. The scorer is passed at compute time (an object or a
local checkpoint folder); nothing is downloaded unless you name a Hub id.
"""

_KWARGS_DESCRIPTION = """
Args:
    prefixes (`list` of `str`): the prefixes.
    continuations (`list` of `str`): the gold (human) continuation of each prefix.
    negatives (`list` of `list` of `str`): at least one negative continuation per prefix.
    scorer: a scorer object, or a checkpoint folder (see rankgen_score).
    scorer_tokenizer (optional): tokenizer for a checkpoint folder that ships none.
    batch_size (`int`, defaults to 32): texts per scorer call.
Returns:
    accuracy, pairwise_accuracy, chance, pairwise_chance (`float`), num_examples, num_pairs (`int`).
Examples:
    >>> import evaluate
    >>> from rankgen_logits import metrics
    >>> module = evaluate.load(metrics.path("continuation_accuracy"))  # doctest: +SKIP
    >>> module.compute(prefixes=["p"], continuations=["gold"], negatives=[["neg"]], scorer=my_scorer)  # doctest: +SKIP
    {'accuracy': 1.0, 'pairwise_accuracy': 1.0, 'chance': 0.5, 'pairwise_chance': 0.5, 'num_examples': 1, ...}
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
class ContinuationAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "prefixes": datasets.Value("string"),
                    "continuations": datasets.Value("string"),
                    "negatives": datasets.Sequence(datasets.Value("string")),
                }
            ),
            reference_urls=["https://arxiv.org/abs/2205.09726"],
        )

    def _compute(self, prefixes, continuations, negatives, scorer=None, scorer_tokenizer=None, batch_size=32):
        if not prefixes:
            raise ValueError("continuation_accuracy got no inputs: pass at least one prefix.")
        return identification_accuracy(
            resolve_scorer(scorer, scorer_tokenizer), prefixes, continuations, negatives, batch_size
        )
