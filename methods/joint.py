"""Joint training: at every task, train on all data seen so far; the upper bound."""
from avalanche.benchmarks.utils import concat_datasets

from harness.method import SESSION_PARAMS, TRAINING_PARAMS, CILMethod
from harness.cil.recipes import SUPERVISED_RECIPES
from harness.registry import register_method


@register_method("joint")
class Joint(CILMethod):
    description = "train on all data seen so far (upper bound)"
    params = {**TRAINING_PARAMS, **SESSION_PARAMS}
    protocol_defaults = SUPERVISED_RECIPES
    transient = ("seen_data",)  # the past experiences' datasets: rebuilt in on_resume, not checkpointed

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen_data = None

    def train_dataset_adaptation(self, **kwargs):
        # As Avalanche's Cumulative strategy: concatenate every experience so far.
        data = self.experience.dataset
        self.seen_data = data if self.seen_data is None else concat_datasets([self.seen_data, data])
        self.adapted_dataset = self.seen_data.train()

    def on_resume(self, past_experiences):
        self.seen_data = concat_datasets([e.dataset for e in past_experiences])
