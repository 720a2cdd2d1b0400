"""chisel: see what reward chiseled into an RL agent.

Record every optimizer update of a training run (`record`), read it back (`load`), and
attribute the weight changes to named features (see docs/).

`import chisel` is light: each public name is imported from its module on first use (PEP 562
module `__getattr__`), so importing chisel loads neither pandas, pyarrow, matplotlib nor the
report, and changes no global state (tests/chisel/test_import_light.py).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from chisel._version import __version__

# public name -> the module that defines it; a name equal to its module's last part is the
# module itself (chisel.metrics). To export a name, add one line here and one in __all__
# (test_import_light checks that the two agree).
_EXPORTS: dict[str, str] = {
    "AttributionInputError": "chisel.attribution.engine",
    "ChiselError": "chisel.errors",
    "Compact": "chisel.capture.config",
    "CorruptStepError": "chisel.errors",
    "FactorsSkippedWarning": "chisel.errors",
    "ForwardPatchWarning": "chisel.attribution.copying",
    "ManifestError": "chisel.errors",
    "MissingShardError": "chisel.errors",
    "MissingStepsWarning": "chisel.errors",
    "NotARunError": "chisel.errors",
    "RecordConfig": "chisel.capture.config",
    "RankMismatchError": "chisel.errors",
    "RecordConfigError": "chisel.errors",
    "Recorder": "chisel.recorder",
    "ResumeMismatchError": "chisel.errors",
    "Run": "chisel.store.reader",
    "RunExistsError": "chisel.errors",
    "SkippedStepError": "chisel.errors",
    "Step": "chisel.store.reader",
    "StepRecord": "chisel.capture.step_record",
    "StepOutOfRangeError": "chisel.errors",
    "StepTypeError": "chisel.errors",
    "TagError": "chisel.errors",
    "TrainModeWarning": "chisel.attribution.functional",
    "UnknownModuleError": "chisel.errors",
    "UnverifiedRunWarning": "chisel.errors",
    "ValidationError": "chisel.validation",
    "WriterError": "chisel.errors",
    "ablation_effects": "chisel.validation",
    "agreement": "chisel.validation",
    "attribute": "chisel.attribution.engine",
    "attribute_ray": "chisel.attribution.distributed",
    "counterfactual": "chisel.counterfactual",
    "load": "chisel.store.reader",
    "load_ledger": "chisel.attribution.ledger",
    "online_ledger": "chisel.online",
    "metrics": "chisel.metrics",
    "pathway_effects": "chisel.validation",
    "pathway_shapley": "chisel.validation",
    "record": "chisel.recorder",
    "register_optimizer": "chisel.attribution.optim_models",
    "timeline": "chisel.attribution.timeline",
    "validation_table": "chisel.validation",
    "write_comparison": "chisel.report",
    "write_report": "chisel.report",
}

__all__ = [
    "AttributionInputError",
    "ChiselError",
    "Compact",
    "CorruptStepError",
    "FactorsSkippedWarning",
    "ForwardPatchWarning",
    "ManifestError",
    "MissingShardError",
    "MissingStepsWarning",
    "NotARunError",
    "RankMismatchError",
    "RecordConfig",
    "RecordConfigError",
    "Recorder",
    "ResumeMismatchError",
    "Run",
    "RunExistsError",
    "SkippedStepError",
    "Step",
    "StepOutOfRangeError",
    "StepRecord",
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
    "attribute_ray",
    "counterfactual",
    "load",
    "load_ledger",
    "metrics",
    "online_ledger",
    "pathway_effects",
    "pathway_shapley",
    "record",
    "register_optimizer",
    "timeline",
    "validation_table",
    "write_comparison",
    "write_report",
]


def __getattr__(name: str) -> Any:
    where = _EXPORTS.get(name)
    if where is None:  # a subpackage (chisel.store, chisel.envs, …), as an eager import had it
        if name.startswith("_"):
            raise AttributeError(f"module 'chisel' has no attribute {name!r}")
        try:
            return importlib.import_module(f"chisel.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"chisel.{name}":
                raise
            raise AttributeError(f"module 'chisel' has no attribute {name!r}") from None
    module = importlib.import_module(where)
    value = module if where == f"chisel.{name}" else getattr(module, name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what type checkers and IDEs see: the same names, imported eagerly
    from chisel import counterfactual, metrics
    from chisel.attribution.engine import AttributionInputError, attribute
    from chisel.attribution.functional import TrainModeWarning
    from chisel.attribution.ledger import load_ledger
    from chisel.attribution.timeline import timeline
    from chisel.capture.config import Compact, RecordConfig
    from chisel.capture.step_record import StepRecord
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
