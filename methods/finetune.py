"""Fine-tuning (Avalanche's Naive): train on each task's data only; the lower bound."""
from harness.cil.regularisers import REGULARISER_PARAMS
from harness.method import SESSION_PARAMS, TRAINING_PARAMS, CILMethod
from harness.cil.recipes import SUPERVISED_RECIPES
from harness.registry import register_method


@register_method("finetune")
class Finetune(CILMethod):
    description = "fine-tune on each new task only (lower bound)"
    params = {**TRAINING_PARAMS, **SESSION_PARAMS, **REGULARISER_PARAMS}
    protocol_defaults = SUPERVISED_RECIPES
