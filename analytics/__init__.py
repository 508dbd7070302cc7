"""Analytics: drift detectors behind one interface, calibrated dataset checks, file input.

* :mod:`.detector`: the interface (``fit``/``score`` returning a :class:`DriftResult`)
  and :data:`REGISTRY` of every detector by name.
* :mod:`.univariate`: numeric detectors (KS, Cramer-von Mises, Anderson-Darling,
  normalized Wasserstein, PSI, Jensen-Shannon, Hellinger, KL) on sorted arrays.
* :mod:`.categorical`: chi-squared, G-test, Fisher exact, total variation, PSI and
  Jensen-Shannon on labels.
* :mod:`.calibration`: multiple-testing correction and practical effect thresholds.
* :mod:`.dataset`: a method per column, one correction across columns, one verdict.
* :mod:`.multivariate`: MMD (permutation test), domain classifier, PCA reconstruction
  error and mean-embedding distance on n×d arrays.
* :mod:`.performance`: prediction drift, confidence coefficient of variation, realized
  performance drop once labels arrive, shadow/canary agreement.
* :mod:`.sequential`: CUSUM, Page-Hinkley, ADWIN and windowed tests calibrated to an
  expected run time between false alarms, in :data:`STREAM_REGISTRY`.
* :mod:`.findings` and :mod:`.scheduler`: the ``findings`` table every check writes to,
  and the scheduler ``stethoscope up`` runs over windows of the ``samples`` table.
* :mod:`.tabular_io` and :mod:`.drift_cli`: the ``stethoscope drift`` command.

Importing this package loads NumPy only; SciPy and pyarrow (the ``server`` extra)
are imported when a p-value is computed or a file is read.

>>> from stethoscope.analytics import REGISTRY
>>> sorted(n for n in ("ks", "chi2", "wasserstein") if n in REGISTRY)
['chi2', 'ks', 'wasserstein']
"""

from .calibration import CORRECTIONS, DEFAULT_THRESHOLDS, Calibration, adjust_pvalues
from .categorical import (
    CategoricalJensenShannon,
    CategoricalPSI,
    Chi2,
    FisherExact,
    GTest,
    TotalVariation,
)
from .dataset import (
    ColumnError,
    DatasetDrift,
    DatasetReport,
    DatasetSummary,
    check_dataset,
)
from .detector import REGISTRY, BatchDetector, DriftResult, SequentialDetector, register
from .findings import Finding, FindingsWriter, from_drift_result
from .scheduler import DriftScheduler
from .multivariate import MMD, DomainClassifier, MeanEmbeddingDistance, PCAReconstruction
from .performance import (
    ConfidenceCV,
    PerformanceDrop,
    PredictionDrift,
    ShadowAgreement,
    accuracy,
    f1,
    f1_macro,
    mae,
    roc_auc,
)
from .sequential import ADWIN, CUSUM, STREAM_REGISTRY, PageHinkley, WindowedKS, WindowedMeanShift, detection_delay
from .univariate import (
    KL,
    KS,
    PSI,
    AndersonDarling,
    CramerVonMises,
    Hellinger,
    JensenShannon,
    Wasserstein,
)

__all__ = [
    "DriftScheduler",
    "Finding",
    "FindingsWriter",
    "from_drift_result",
    "ADWIN",
    "CUSUM",
    "MMD",
    "STREAM_REGISTRY",
    "ConfidenceCV",
    "DomainClassifier",
    "MeanEmbeddingDistance",
    "PCAReconstruction",
    "PageHinkley",
    "PerformanceDrop",
    "PredictionDrift",
    "ShadowAgreement",
    "WindowedKS",
    "WindowedMeanShift",
    "accuracy",
    "detection_delay",
    "f1",
    "f1_macro",
    "mae",
    "roc_auc",
    "CORRECTIONS",
    "DEFAULT_THRESHOLDS",
    "KL",
    "KS",
    "PSI",
    "REGISTRY",
    "AndersonDarling",
    "BatchDetector",
    "Calibration",
    "CategoricalJensenShannon",
    "CategoricalPSI",
    "Chi2",
    "ColumnError",
    "CramerVonMises",
    "DatasetDrift",
    "DatasetReport",
    "DatasetSummary",
    "DriftResult",
    "FisherExact",
    "GTest",
    "Hellinger",
    "JensenShannon",
    "SequentialDetector",
    "TotalVariation",
    "Wasserstein",
    "adjust_pvalues",
    "check_dataset",
    "register",
]
