"""MAE-CIL: Masked Autoencoders are Efficient Class Incremental Learners (Zhai et al., ICCV 2023).

Model (harness/nn/mae.py): a ViT that classifies and, with a decoder of its own width,
reconstructs masked images (the paper's mask ratio 0.75, 0.5 on QuickDraw; pixel MSE on the masked
patches), trained jointly.

Exemplars are a random 1 - mask_ratio of an image's patches plus their positions, not whole
images: one uint8 tensor per exemplar of shape (kept patches, 1 + P*P*C), the position
index in column 0. At 28 px with patch 4 the paper's 25% is 12 x 17 = 204 bytes against 784
for the image, so a byte budget holds ~3.8x more exemplars than iCaRL's; QuickDraw's default,
half the patches, is 24 x 17 = 408 bytes (~1.9x). The budget is
`mae_cil.memory_bytes` (default: the bytes of 2000 full uint8 images, iCaRL's memory).
Which images are kept: herding on the model's features (as the paper); which patches:
random, from a generator seeded by the run seed and the class.

After each task every exemplar is rebuilt by the current decoder (the stored patches
pasted back in); the next task replays these rebuilt images with its new data, so the
training set holds reconstructions, never originals.

As the reference code (docs/methods.md): per task a fresh AdamW, warm-up then cosine per
iteration; loss = (1 - a) * (CE over all seen classes + reconstruction + detail) +
a * KD (T=2) from the previous model, a = old classes / seen classes; after every later
task a balanced fine-tuning of the classifier on the (class-balanced) memory with the
encoder frozen: here on the rebuilt exemplars' features. Bilateral part
(`mae_cil.bilateral`): see harness/nn/mae.py.

Our choices, because old classes come back only as reconstructions (measurements in the
README): `replay_view` also classifies (and distils) each training sample's own
reconstruction from its kept share of patches, so "looks rebuilt" does not mean "old class";
`classifier=nme` predicts by the nearest mean of the rebuilt exemplars of every class;
on QuickDraw a KD multiplier of 0.25, half the patches per exemplar and a pixel refiner after
the decoder (`refine_layers`, harness/nn/mae.py), all chosen on quickdraw40_4x10.
Left out from the reference: DyTox's task tokens and per-task heads (one growing linear
head), mixup, SAM.

Patch size: 4 at 28 and 32 px (49 and 64 patches; the paper's 4 at 32 px). Larger images use 16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.cil.distill import frozen_copy, softmax_kd
from harness.errors import HarnessError
from harness.nn.mae import MaskedViT, mae_losses, patchify, random_keep
from harness.cil.memory import ExemplarMemory, check_budget, class_means, to_float, to_uint8
from harness.method import TRAINING_PARAMS, materialise
from harness.params import Param
from harness.registry import register_method
from harness.cil.rehearsal import RehearsalMethod

FULL_IMAGES = 2000  # the default byte budget is this many full uint8 images (iCaRL's memory)
# Acceptance checks of rebuilt exemplars (rebuilt_vs_real): filled background, rebuilt / real accuracy.
MAX_BACKGROUND = 0.05
MIN_RATIO = 0.7


@register_method("mae_cil")
class MAECIL(RehearsalMethod):
    description = ("MAE-CIL: ViT + masked-autoencoder replay of partial-patch exemplars (25% in the paper), "
                   "bilateral MAE (Zhai et al. 2023)")
    params = {
        **{k: v for k, v in TRAINING_PARAMS.items() if k not in ("backbone", "momentum", "lr_schedule")},
        "init_epochs": Param(0, "epochs of the first task; 0 = epochs (later tasks replay the memory too, so an "
                             "epoch of theirs is longer)", low=0),
        "lr": Param(5e-4, "AdamW peak learning rate", low=0.0),
        "incremental_lr": Param(0.0, "peak learning rate of the tasks after the first; 0 = lr (the reference's "
                                "incremental_lr)", low=0.0),
        "weight_decay": Param(1e-6, "AdamW weight decay (the reference's)", low=0.0),
        "lr_schedule": Param("warmup_cosine", "per-task schedule, stepped per iteration: constant, cosine to "
                             "min_lr, or warm-up over warmup_epochs then cosine to min_lr (the reference's)",
                             choices=("none", "cosine", "warmup_cosine")),
        "warmup_epochs": Param(1.0, "warmup_cosine: epochs of linear warm-up at the start of every task", low=0.0),
        "min_lr": Param(1e-5, "warmup_cosine: the lr at the end of every task", low=0.0),
        "memory_bytes": Param(0, "byte budget of the stored patches; 0 = the bytes of 2000 full images", low=0),
        "mask_ratio": Param(0.75, "share of patches masked in training and dropped from exemplars "
                            "(0 = whole-image exemplars, the control)", low=0.0, high=0.98),
        "patch": Param(0, "patch size in pixels; 0 = 4 up to 64 px, else 16", low=0),
        "dim": Param(384, "ViT width", low=8),
        "depth": Param(6, "ViT blocks", low=2),
        "heads": Param(12, "attention heads", low=1),
        "attention": Param("plain", "encoder attention: plain multi-head, or ConViT's gated positional "
                           "self-attention (gpsa, the reference code's encoder), initialised local",
                           choices=("plain", "gpsa")),
        "decoder_dim": Param(0, "MAE decoder width; 0 = the ViT's (the reference's)", low=0),
        "decoder_depth": Param(1, "MAE decoder blocks", low=1),
        "refine_layers": Param(0, "ours: dilated conv layers that correct the decoded image across patch borders, "
                               "from the known pixels (0 = off, the reference's decoder; harness/nn/mae.py PixelRefiner)",
                               low=0),
        "shallow_block": Param(2, "block whose tokens feed the shallow (bilateral) branch (the reference's 2nd)",
                               low=1),
        "bilateral": Param(True, "shallow branch + FFT high-pass + token fusion + detail loss"),
        "recon": Param(1.0, "weight of the MAE reconstruction loss", low=0.0),
        "recon_on_replay": Param(True, "reconstruction and detail losses on replayed (rebuilt) exemplars too; "
                                 "false = on the task's real images only"),
        "recon_loss": Param("mse", "reconstruction loss on the masked pixels: MSE (the reference's; its optimum "
                            "is the mean, grey where a stroke is uncertain) or L1 (the median)", choices=("mse", "l1")),
        "threshold": Param(0.0, "decoder-filled pixels of rebuilt exemplars (and of replay_view) are "
                           "soft-thresholded here, max(0, v - t) / (1 - t): takes out the haze an MSE decoder "
                           "paints where unsure, on ink-on-empty images, with the strokes it is unsure of (0 = off; "
                           "on QuickDraw it costs accuracy, README)", low=0.0, high=0.99),
        "detail": Param(0.02, "weight of the detail loss", low=0.0),
        "kd": Param(1.0, "multiplier of the distillation term, itself weighted by old / seen classes", low=0.0),
        "temperature": Param(2.0, "distillation temperature", low=1e-3),
        "balanced_epochs": Param(20, "balanced fine-tuning of the classifier on the rebuilt memory after every "
                                 "later task (0 = off)", low=0),
        "balanced_lr": Param(1e-3, "balanced fine-tuning: AdamW learning rate", low=0.0),
        "classifier": Param("nme", "prediction: nearest mean of the rebuilt exemplars, or the linear head",
                            choices=("nme", "head")),
        "replay_view": Param(True, "also classify (and distil) each sample's reconstruction from 1 - mask_ratio "
                             "of its patches"),
    }
    protocol_defaults = {
        # Sized for 2 CPU cores, chosen on quickdraw20/40 (README): 49 tokens of width 64, 4 blocks.
        # A ViT from scratch needs ~30 epochs on a first task of 800 doodles; later tasks replay
        # up to ~10x as many rebuilt exemplars per epoch. Without DyTox's per-task tokens the one
        # encoder needs more room for new classes than the reference's KD weight leaves (kd=0.25),
        # and half the patches rebuild doodles better than a quarter at the same bytes (mask 0.5);
        # a pixel refiner continues strokes across patch borders (refine_layers=4).
        "quickdraw": {"init_epochs": 30, "epochs": 10, "batch_size": 64, "lr": 2e-3, "dim": 64, "depth": 4,
                      "heads": 4, "kd": 0.25, "mask_ratio": 0.5, "refine_layers": 4},
        "fmnist": {"init_epochs": 15, "epochs": 5, "batch_size": 64, "lr": 2e-3, "dim": 64, "depth": 4, "heads": 4},
        # The paper's CIFAR-100 recipe (docs/methods.md): width 384, 6 blocks, 12 heads, lr 5e-4, 400 epochs.
        "cifar100": {"epochs": 400, "batch_size": 128},
        "imagenet_r": {"epochs": 50, "batch_size": 128},
        "imagenet100": {"epochs": 50, "batch_size": 128},
    }
    transient = ("replayed",)  # this task's replayed images: made again when the next task starts

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        hp, p = self.hp, self.context.protocol
        n = self.model.num_patches
        self.keep = max(1, round(n * (1 - hp["mask_ratio"])))  # patches an exemplar keeps (12 of 49)
        self.item_bytes = self.keep * (1 + self.model.patch_dim)  # uint8 pixels + one position byte each
        budget = hp["memory_bytes"] or FULL_IMAGES * p.channels * p.image_size ** 2
        self.memory = ExemplarMemory(max_bytes=budget)
        check_budget(self.memory, p.num_classes, self.item_bytes, "mae_cil")
        self.replayed: torch.Tensor | None = None  # uint8 reconstructions replayed in the current task
        self._rebuilt_memory: torch.Tensor | None = None  # float rebuild of the memory after the last task

    # ---- model -----------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        p, hp = self.context.protocol, self.hp
        patch = hp["patch"] or (4 if p.image_size <= 64 else 16)
        if p.image_size % patch:
            raise HarnessError(f"mae_cil.patch={patch} does not divide the {p.image_size}-px images of {p.name}")
        if (p.image_size // patch) ** 2 > 255:
            raise HarnessError(f"mae_cil.patch={patch}: over 255 patches, positions no longer fit one byte")
        if hp["dim"] % hp["heads"]:
            raise HarnessError(f"mae_cil.dim={hp['dim']} is not a multiple of mae_cil.heads={hp['heads']}")
        if hp["shallow_block"] >= hp["depth"]:
            raise HarnessError(f"mae_cil.shallow_block must be below mae_cil.depth={hp['depth']}")
        return MaskedViT(channels=p.channels, image_size=p.image_size, patch=patch, dim=hp["dim"],
                         depth=hp["depth"], heads=hp["heads"], decoder_dim=hp["decoder_dim"],
                         decoder_depth=hp["decoder_depth"], shallow_block=hp["shallow_block"],
                         bilateral=hp["bilateral"], attention=hp["attention"], refine_layers=hp["refine_layers"])

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=self.hp["lr"], weight_decay=self.hp["weight_decay"])

    def build_plugins(self, optimizer):
        return []  # the schedule follows each task's own length (init_epochs, epochs): see below

    # ---- training ----------------------------------------------------------------------
    def learn(self, experience) -> None:
        hp = self.hp
        self.train_epochs = hp["init_epochs"] if self.old_model is None and hp["init_epochs"] else hp["epochs"]
        self.restart_optimizer()  # a new task starts its schedule (and its lr) over
        if self.old_model is not None and hp["incremental_lr"]:
            for group in self.optimizer.param_groups:
                group["lr"] = hp["incremental_lr"]
        self.train(experience)
        self._update_memory(experience)
        features, labels = self._rebuilt_features()
        if self.old_model is not None and self.hp["balanced_epochs"]:
            self._balanced_finetuning(features, labels)
        self.means = class_means(features, labels, self.memory.classes).to(self.device) \
            if self.hp["classifier"] == "nme" else None
        self.old_model = frozen_copy(self.model)

    def _before_training_iteration(self, **kwargs):
        schedule = self.hp["lr_schedule"]
        if schedule != "none":
            warmup = self.hp["warmup_epochs"] if schedule == "warmup_cosine" else 0
            self.warmup_cosine_per_task(round(warmup * len(self.dataloader)), self.hp["min_lr"])
        super()._before_training_iteration(**kwargs)

    @torch.no_grad()
    def _rebuilt_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of every rebuilt exemplar, old and new classes alike, and their labels.

        Class means and the balanced fine-tuning both see rebuilt images only: the gap between
        real and rebuilt images then favours no class, where a classifier trained on real new
        images and rebuilt old ones learns "looks real" = "new class".
        """
        x, y = self.memory.tensors()
        rebuilt = self._rebuilt_memory = self.rebuild(x)  # the next task replays these: no second decode
        self.model.eval()
        f = torch.cat([self.model.features(xb.to(self.device)).cpu() for xb in rebuilt.split(self.eval_mb_size)])
        return f, y

    def _balanced_finetuning(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """The reference's balanced stage: the classifier alone, on the class-balanced memory
        (its rebuilt exemplars' features: the encoder is frozen, so they are computed once)."""
        head, hp = self.model.head, self.hp
        head.train()
        opt = torch.optim.AdamW(head.parameters(), lr=hp["balanced_lr"], weight_decay=hp["weight_decay"])
        g = torch.Generator().manual_seed(self.context.seed * 1_000_003 + len(self.memory.classes))
        features, labels = features.to(self.device), labels.to(self.device)
        with torch.enable_grad():
            for _ in range(hp["balanced_epochs"]):
                for idx in torch.randperm(len(labels), generator=g).split(hp["batch_size"]):
                    loss = F.cross_entropy(head(features[idx]), labels[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()

    def train_dataset_adaptation(self, **kwargs):
        self.replayed = None
        super().train_dataset_adaptation(**kwargs)

    def replay_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.memory.tensors()
        # Rebuilt when the class means were taken (same model, same memory) or now (resumed run).
        rebuilt = self._rebuilt_memory if self._rebuilt_memory is not None else self.rebuild(x)
        self._rebuilt_memory = None
        self.replayed = to_uint8(rebuilt)  # quantised like the stream's images
        return self.replayed, y

    @torch.no_grad()
    def rebuild(self, items: torch.Tensor) -> torch.Tensor:
        """Full float images in [0, 1] decoded from stored exemplars (kept patches pasted back)."""
        # Back to the caller's mode afterwards: Avalanche adapts the head after this, and
        # IncrementalClassifier activates the new classes' outputs only in training mode.
        was_training = self.model.training
        self.model.eval()
        out = []
        for chunk in items.split(self.eval_mb_size):
            positions = chunk[..., 0].long().to(self.device)
            patches = to_float(chunk[..., 1:]).to(self.device)
            image = self.model.reconstruct(patches, positions)["image"]
            out.append(self.model.as_exemplar(image, patches, positions, self.hp["threshold"]).cpu())
        self.model.train(was_training)
        return torch.cat(out)

    def criterion(self):
        if not self.is_training:
            return super().criterion()
        hp = self.hp
        teacher = self.teacher_logits()
        # The reference's weighting: the more classes are old, the more the loss is distillation.
        share = 0.0 if teacher is None else teacher.shape[1] / self.mb_output.shape[1]
        real = None if hp["recon_on_replay"] or teacher is None else self.mb_y >= teacher.shape[1]
        aux = mae_losses(self.model, self.mb_x, self.keep, view=hp["replay_view"], recon_loss=hp["recon_loss"],
                         targets=real, threshold=hp["threshold"])
        new = F.cross_entropy(self.mb_output, self.mb_y) + hp["recon"] * aux["recon"]
        if "detail" in aux:
            new = new + hp["detail"] * aux["detail"]
        old = 0.0
        if teacher is not None:
            old = softmax_kd(self.mb_output, teacher, hp["temperature"])
        if hp["replay_view"]:
            # Old classes come back only as reconstructions; classifying every sample's
            # reconstruction as well keeps "looks reconstructed" from meaning "old class".
            view_logits = self.model(aux["view"])
            new = new + F.cross_entropy(view_logits, self.mb_y)
            if teacher is not None:
                with torch.no_grad():
                    view_teacher = self.old_model(aux["view"])
                old = old + softmax_kd(view_logits, view_teacher, hp["temperature"])
        return (1 - share) * new + share * hp["kd"] * old

    # ---- exemplars ---------------------------------------------------------------------
    @torch.no_grad()
    def _update_memory(self, experience) -> None:
        # One pass over the new data through its own loader (the global RNG must not move).
        images, labels = materialise(experience.dataset.eval(), self.eval_mb_size)
        self.model.eval()
        features = torch.cat([self.model.features(xb.to(self.device)).cpu() for xb in images.split(self.eval_mb_size)])
        self.memory.update(images, labels, experience.classes_in_this_experience, self.context.seed,
                           features=features, encode=self.encode_exemplars, item_bytes=self.item_bytes)

    def encode_exemplars(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 (n, kept patches, 1 + P*P*C): a random 1 - mask_ratio of each image's patches, position first."""
        patches = patchify(to_uint8(images), self.model.patch)
        positions = random_keep(len(images), self.model.num_patches, self.keep, generator)
        kept = patches.gather(1, positions.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return torch.cat([positions.to(torch.uint8).unsqueeze(-1), kept], 2)


def rebuilt_exemplars(method: MAECIL, images: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`images` stored as exemplars and rebuilt, and a (n, patches, pixels) mask of the pixels the decoder filled."""
    items = method.encode_exemplars(images, torch.Generator().manual_seed(seed))
    rebuilt = method.rebuild(items)
    kept = torch.zeros(len(images), method.model.num_patches, method.model.patch_dim, dtype=torch.bool)
    kept.scatter_(1, items[..., 0].long().unsqueeze(-1).expand(-1, -1, kept.shape[-1]), True)
    return rebuilt, ~kept


def _accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (scores.argmax(1) == labels).float().mean().item()


def rebuilt_vs_real(method: MAECIL, test_images: torch.Tensor, test_labels: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """Rebuilt exemplars against the real images they stand for (benchmarks/mae_rebuild_check.py):
    the background of decoder-filled pixels that are 0 in the real image, the share of filled
    pixels in [0.25, 0.75] (rebuilt and real), accuracy on real and on rebuilt test images by the
    method's prediction and by its head, and the ratio rebuilt / real."""
    rebuilt, filled = rebuilt_exemplars(method, test_images, seed)
    real_p = patchify(test_images, method.model.patch)
    rebuilt_p = patchify(rebuilt, method.model.patch)
    background = filled & (real_p == 0)
    grey = lambda p: ((p >= 0.25) & (p <= 0.75))[filled].float().mean().item()  # noqa: E731

    def scores(fn, x):
        return torch.cat([fn(xb) for xb in x.split(method.eval_mb_size)]).cpu()

    head = lambda x: method.model.eval()(x.to(method.device))  # noqa: E731
    with torch.no_grad():
        out = {
            "background": rebuilt_p[background].mean().item(),
            "grey_share": grey(rebuilt_p), "grey_share_real": grey(real_p),
            "acc_real": _accuracy(scores(method.class_scores, test_images), test_labels),
            "acc_rebuilt": _accuracy(scores(method.class_scores, rebuilt), test_labels),
            "head_acc_real": _accuracy(scores(head, test_images), test_labels),
            "head_acc_rebuilt": _accuracy(scores(head, rebuilt), test_labels),
        }
    out["ratio"] = out["acc_rebuilt"] / max(out["acc_real"], 1e-9)
    return out
