"""chisel: see what reward chiseled into an RL agent.

Record every optimizer update of a training run (`record`), read it back (`load`), and
attribute the weight changes to named features (see docs/).
"""

from chisel import metrics
from chisel.attribution.engine import AttributionInputError, attribute
from chisel.attribution.functional import TrainModeWarning
from chisel.attribution.ledger import load_ledger
from chisel.attribution.timeline import timeline
from chisel.capture.config import RecordConfig
from chisel.errors import (
    ChiselError,
    CorruptStepError,
    FactorsSkippedWarning,
    ManifestError,
    MissingStepsWarning,
    NotARunError,
    RecordConfigError,
    ResumeMismatchError,
    RunExistsError,
    SkippedStepError,
    StepOutOfRangeError,
    StepTypeError,
    TagError,
    UnknownModuleError,
    UnverifiedRunWarning,
    WriterError,
)
from chisel.recorder import Recorder, record
from chisel.report import write_comparison, write_report
from chisel.store.reader import Run, Step, load
from chisel.validation import (
    ValidationError,
    ablation_effects,
    agreement,
    pathway_effects,
    pathway_shapley,
    validation_table,
)

__version__ = "0.1.0"

__all__ = [
    "AttributionInputError",
    "ChiselError",
    "CorruptStepError",
    "FactorsSkippedWarning",
    "ManifestError",
    "MissingStepsWarning",
    "NotARunError",
    "RecordConfig",
    "RecordConfigError",
    "Recorder",
    "ResumeMismatchError",
    "Run",
    "RunExistsError",
    "SkippedStepError",
    "Step",
    "StepOutOfRangeError",
    "StepTypeError",
    "TagError",
    "TrainModeWarning",
    "UnknownModuleError",
    "UnverifiedRunWarning",
    "ValidationError",
    "WriterError",
    "__version__",
    "ablation_effects",
    "agreement",
    "attribute",
    "load",
    "load_ledger",
    "metrics",
    "pathway_effects",
    "pathway_shapley",
    "record",
    "timeline",
    "validation_table",
    "write_comparison",
    "write_report",
]
