"""Top-1 accuracy as an ``evaluate`` metric, shipped inside hf-wemoe so that it loads without the Hub.

Load it with ``hf_wemoe.metrics.load_accuracy()`` (or ``evaluate.load(<path of this folder>)``).
"""

import datasets
import evaluate

_DESCRIPTION = """\
Top-1 accuracy: the fraction of examples whose predicted class id equals the reference class id."""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (list of int): predicted class ids (e.g. ``logits.argmax(-1)``).
    references (list of int): true class ids.
    normalize (bool, default True): return the fraction of correct predictions; False returns their count.
Returns:
    accuracy (float): in [0, 1] when normalize is True (nan for no examples), else the number correct.
Example:
    >>> metric = hf_wemoe.metrics.load_accuracy()
    >>> metric.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2])
    {'accuracy': 0.75}
"""

_CITATION = ""


class Accuracy(evaluate.Metric):
    """Top-1 classification accuracy over integer class ids."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize: bool = True) -> dict:
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        correct = sum(int(p == r) for p, r in zip(predictions, references))
        if not normalize:
            return {"accuracy": float(correct)}
        return {"accuracy": correct / len(predictions) if len(predictions) else float("nan")}
