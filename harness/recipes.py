"""Training recipes per protocol family, shared by methods that train a classifier end to end.

Methods start from these and change what their paper changes (see each method file).
"""

SUPERVISED_RECIPES = {
    # Avalanche's QuickDraw peer recipe (docs/methods.md): SGD 0.01, momentum 0.9, 10 epochs, batch 64.
    "quickdraw": {"backbone": "convnet", "lr": 0.01, "epochs": 10, "batch_size": 64},
    "fmnist": {"backbone": "convnet", "lr": 0.01, "epochs": 5, "batch_size": 64},
    "cifar100": {"backbone": "resnet32", "lr": 0.1, "epochs": 100, "batch_size": 128,
                 "weight_decay": 2e-4, "lr_schedule": "cosine"},
    "imagenet_r": {"backbone": "resnet18", "lr": 0.1, "epochs": 50, "batch_size": 128,
                   "weight_decay": 5e-4, "lr_schedule": "cosine"},
    "imagenet100": {"backbone": "resnet18", "lr": 0.1, "epochs": 50, "batch_size": 128,
                    "weight_decay": 5e-4, "lr_schedule": "cosine"},
}
