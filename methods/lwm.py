"""LwM: Learning without Memorizing (Dhar, Singh, Peng, Wu, Chellappa; CVPR 2019).

Loss on a new task = CE on the new classes + beta * KD (T=2, no T^2 factor, as LwF) of the
previous model's logits on the old classes + gamma * L_AD, the attention distillation: the Grad-CAM
maps of the previous model's top old class at the last convolutional block, computed
for the previous and the current model on the same input, vectorised, L2-normalised,
L1 distance. The current model's map is built with create_graph=True so L_AD trains it.

Exemplar-free by default. `memory=N` keeps N class-balanced exemplars, chosen at
random (LwM has no selection rule of its own), in harness.cil.memory's store, replayed
with the new data; CE then covers all seen classes, since replayed samples carry old labels.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from harness.cil.regularisers import REGULARISER_PARAMS
from harness.cil.distill import frozen_copy, softmax_kd
from harness.nn.gradcam import FeatureMapHook, attention_distance, cam_from, grad_cam, last_conv_block
from harness.cil.memory import ExemplarMemory, check_budget, to_uint8
from harness.method import SESSION_PARAMS, TRAINING_PARAMS, materialise
from harness.params import Param
from harness.cil.recipes import SUPERVISED_RECIPES
from harness.registry import register_method
from harness.cil.rehearsal import ExemplarReplay


@register_method("lwm")
class LwM(ExemplarReplay):
    description = "Learning without Memorizing: KD + Grad-CAM attention distillation, exemplar-free (Dhar et al. 2019)"
    params = {
        **TRAINING_PARAMS,
        # Grad-CAM distillation needs the backbone's gradients: no freeze_backbone
        **{k: v for k, v in SESSION_PARAMS.items() if k != "freeze_backbone"},
        **REGULARISER_PARAMS,
        "beta": Param(1.0, "weight of the logit distillation", low=0.0),
        "gamma": Param(1.0, "weight of the attention distillation L_AD", low=0.0),
        "temperature": Param(2.0, "distillation temperature", low=1e-3),
        "t_squared": Param(False, "scale the logit distillation by T^2 (Hinton); LwF and FACIL's LwF do not"),
        "memory": Param(0, "exemplars kept in total (class-balanced, random); 0 = exemplar-free", low=0),
    }
    # The finetune recipe unchanged: LwM changes the loss only, so tables compare at equal epochs.
    protocol_defaults = SUPERVISED_RECIPES
    transient = ("_fmap",)  # the last batch's feature map, caught by a hook for Grad-CAM

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.old_model: nn.Module | None = None
        self.n_old = 0  # classes seen before the current task (labels 0..n_old-1)
        p = self.context.protocol
        self.memory = ExemplarMemory(max_items=self.hp["memory"])
        if self.hp["memory"] > 0:
            check_budget(self.memory, p.num_classes, p.channels * p.image_size ** 2, "lwm")
        self._layer_name: str | None = None  # Grad-CAM layer, found on the first batch
        self._fmap: torch.Tensor | None = None

    # ---- training ----------------------------------------------------------------------
    def learn(self, experience) -> None:
        self.train(experience)
        self.n_old = max(self.n_old, max(experience.classes_in_this_experience) + 1)
        self.old_model = frozen_copy(self.model)
        if self.hp["memory"] > 0:
            self._update_memory(experience)

    @torch.no_grad()
    def _update_memory(self, experience) -> None:
        # One pass over the new data (it must not move the global RNG: resumed runs replay it);
        # the memory stores uint8 images.
        images, labels = materialise(experience.dataset.eval(), self.eval_mb_size)
        self.memory.update(to_uint8(images), labels, experience.classes_in_this_experience, self.context.seed)

    def _cam_layer(self, model: nn.Module) -> nn.Module:
        if self._layer_name is None:
            layer = last_conv_block(model, self.mb_x)
            self._layer_name = next(n for n, m in model.named_modules() if m is layer)
        return model.get_submodule(self._layer_name)

    def forward(self):
        if self.old_model is None or not self.is_training:
            return super().forward()
        # Keep the current model's feature map: its Grad-CAM is built from this forward.
        with FeatureMapHook(self._cam_layer(self.model)) as hook:
            out = self.model(self.mb_x)
        self._fmap = hook.output
        return out

    def criterion(self):
        logits, y, n = self.mb_output, self.mb_y, self.n_old
        if self.old_model is None or not self.is_training:
            return F.cross_entropy(logits, y)
        # Exemplar-free: CE over the new classes' logits only, so it does not push the
        # old classes' logits down; the distillation terms take care of them.
        ce = F.cross_entropy(logits, y) if len(self.memory) else F.cross_entropy(logits[:, n:], y - n)
        # Old model: its logits (head of n outputs) and the Grad-CAM of its top old class.
        old_cams, old_logits = grad_cam(self.old_model, self.mb_x, None, self._cam_layer(self.old_model))
        top = old_logits.argmax(1)
        cams = cam_from(self._fmap, logits.gather(1, top[:, None]).squeeze(1), create_graph=True)
        kd = softmax_kd(logits, old_logits.detach(), self.hp["temperature"], t_squared=self.hp["t_squared"])
        ad = attention_distance(cams, old_cams.detach())
        return ce + self.hp["beta"] * kd + self.hp["gamma"] * ad
