"""Growing dendrites during training: the controller and its parts.

- :mod:`.policy`: :class:`GrowthPolicy`, the pure decision rule (scores in, decision and actions out);
- :mod:`.actuator`: :class:`ModelActuator`, which carries the actions out on the model;
- :mod:`.sinks`: where records go (CSV history, figure, ``best/``, TensorBoard);
- :mod:`.checkpoints`: ``save_latest`` / ``resume`` of whole runs;
- :mod:`.state`: the saved state's layout, validation and migrations;
- :mod:`.controller`: :class:`GrowthController`, which connects them.
"""

from .checkpoints import Resumed
from .controller import GrowthController, StepResult
from .policy import Action, Decision, Event, GrowthPolicy, Phase, PolicyState

__all__ = [
    "Action",
    "Decision",
    "Event",
    "GrowthController",
    "GrowthPolicy",
    "Phase",
    "PolicyState",
    "Resumed",
    "StepResult",
]
