"""Class-incremental building blocks: exemplar memory and herding, distillation, rehearsal
mixins (replay, nearest-mean classifier, teacher), training recipes, and GMM's stage-1
alignment on the classes no protocol uses."""
