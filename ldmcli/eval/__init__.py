"""``ldm eval``: the numbers of upstream's model-zoo tables, measured by the tool.

* :func:`evaluate_samples` (``ldm eval samples``): FID, IS, KID, precision/recall of images against a reference;
* :func:`evaluate_autoencoder` (``ldm eval ae``): rFID, PSNR, SSIM, LPIPS of a first stage's reconstructions;
* :func:`evaluate_model` (``ldm eval model``): sample N images (resumable, sweeps) and measure them.

Inception and the metric functions are torch-fidelity's (:mod:`ldmcli.eval.fidelity`); its weights come from the
store's ``inception`` asset. Nothing here prints: progress goes to ``on_event(EvalEvent)``.
"""

from ldmcli.eval.metrics import EvalEvent, SampleMetrics, evaluate_samples
from ldmcli.eval.reconstruction import ReconstructionMetrics, evaluate_autoencoder
from ldmcli.eval.sweep import SweepResult, evaluate_model

__all__ = ["EvalEvent", "ReconstructionMetrics", "SampleMetrics", "SweepResult", "evaluate_autoencoder",
           "evaluate_model", "evaluate_samples"]
