"""Training recipes per protocol family, shared by methods that train a classifier end to end.

Methods start from these and change what their paper changes (see each method file).
"""

# 28x28 grey images (doodles, clothes). Chosen on quickdraw40_4x10's 40 classes trained at
# once (the joint bound), never on the reported quickdraw100_10x10: benchmarks/recipe_search.py
# prints the figures, the README's "training recipe" section holds them. The decayed lr also
# keeps batch-norm statistics valid in eval mode.
_SMALL_GREY = {"backbone": "convnet_bn", "lr": 0.1, "weight_decay": 5e-4, "batch_size": 64, "epochs": 30,
               "lr_schedule": "cosine", "augment": "crop_flip", "crop_padding": 2}

SUPERVISED_RECIPES = {
    "quickdraw": _SMALL_GREY,
    # 6,000 images per class (75x QuickDraw's 80): fewer epochs for the same number of steps' worth.
    "fmnist": {**_SMALL_GREY, "epochs": 5},
    "cifar100": {"backbone": "resnet32", "lr": 0.1, "epochs": 100, "batch_size": 128,
                 "weight_decay": 2e-4, "lr_schedule": "cosine"},
    "imagenet_r": {"backbone": "resnet18", "lr": 0.1, "epochs": 50, "batch_size": 128,
                   "weight_decay": 5e-4, "lr_schedule": "cosine"},
    "imagenet100": {"backbone": "resnet18", "lr": 0.1, "epochs": 50, "batch_size": 128,
                    "weight_decay": 5e-4, "lr_schedule": "cosine"},
}
