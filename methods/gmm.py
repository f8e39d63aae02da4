"""GMM: Generative Multi-modal Models are Good Class-Incremental Learners (Cao et al., CVPR 2024).

A vision-language model writes the label: every training image becomes (image,
"This is a <noun> of a <class>.") after the question "What is this <noun> of?"; only
the projection from the frozen image encoder into the frozen language model trains
(cross-entropy on the answer tokens). To predict, the model answers greedily, the
template is stripped and the class text is embedded with f_text; cosine similarity to
f_text of every seen class name is the score vector, so the harness evaluates GMM like
any other method. No classifier grows.

The paper starts from MiniGPT-4's aligned projection; the offline stack's is random, so it is
first aligned on the dataset's classes that no built-in protocol, nor the run's, uses (gmm.align,
harness/cil/alignment.py).

Options beyond the paper, each its own table row via --set (without replay the projection
drifts toward the newest task in text space):
  gmm.memory=N            class-balanced random exemplars (images), replayed with their answers
                          (the released GMM run keeps 2,000)
  gmm.feature_replay=true exemplar-free: stored encoder tokens (or per-class Gaussian
                          statistics) of old classes replayed; the encoder is frozen, so
                          they stay valid; memory reported in bytes
  gmm.lora_r=R            LoRA on the language model's q/v projections (peft)

Avalanche template pieces overridden: the dataloader yields cached encoder tokens (plus
replay) instead of images, forward() returns the language-model loss and criterion()
passes it through; the optimizer holds only the trainable parameters and is reset per task.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from harness.cil.alignment import AlignmentSettings, aligned_projection
from harness.errors import HarnessError
from harness.cil.memory import ExemplarMemory, check_budget, to_uint8
from harness.method import TensorBatches, materialise
from harness.params import Param
from harness.registry import VLM_STACKS, register_method
from harness.cil.rehearsal import ExemplarReplay
from harness.nn.vlm import (answer_sentence, build_stack, cache_dir, feature_cache, lm_precision, text_encoder_by_name,
                         text_scores)


BUNDLED_ALIGNMENTS = Path(__file__).resolve().parent / "data"  # prebuilt stage-1 projections (harness.cil.alignment)


@register_method("gmm")
class GMM(ExemplarReplay):
    description = "generative multimodal model: a VLM writes the class name, f_text maps it to a class"
    params = {
        # The paper's recipe in form (AdamW, wd 0.05 but none on biases, per-iteration warm-up then
        # cosine to a third of the peak, a fresh optimizer per task); lr and epochs for the offline
        # stack chosen on quickdraw40_4x10 (benchmarks/gmm_recipe_sweep.py, README).
        "epochs": Param(2, "epochs per task", low=1),
        "batch_size": Param(16, "training mini-batch size", low=1),
        "lr": Param(3e-4, "AdamW peak learning rate (the paper: 3e-6 on MiniGPT-4's 7B stack, hf_llava's default)",
                    low=0.0),
        "weight_decay": Param(0.05, "AdamW weight decay", low=0.0),
        "lr_schedule": Param("warmup_cosine", "per-task learning-rate schedule: constant, cosine per epoch, or "
                             "MiniGPT-4's linear warm-up over warmup_steps iterations then a per-iteration cosine "
                             "to min_lr", choices=("none", "cosine", "warmup_cosine")),
        "warmup_steps": Param(25, "warmup_cosine: iterations of linear warm-up at the start of every task (the "
                              "paper's 200 at batch 2 are 400 samples: 25 batches of 16)", low=0),
        "min_lr": Param(1e-4, "warmup_cosine: the lr at the end of every task", low=0.0),
        "decay_biases": Param(False, "weight decay on biases and other 1-D parameters too (MiniGPT-4 exempts them)"),
        "model": Param("offline", "vision-language stack", choices=tuple(VLM_STACKS.names())),
        "align": Param("auto", "stage-1 alignment of a random projection before any task, on the dataset's classes "
                       "that neither this protocol nor a built-in one uses (cached); auto = disjoint for the offline stack, none for "
                       "hf and hf_llava (already aligned) and tiny", choices=("auto", "none", "disjoint")),
        "align_per_class": Param(40, "alignment: training images per alignment class", low=1),
        "align_epochs": Param(1, "alignment: epochs over the alignment images", low=1),
        "align_lr": Param(1e-3, "alignment: peak AdamW lr (100-step warm-up, cosine to lr/100)", low=0.0),
        "hf_name": Param("llava-hf/llava-1.5-7b-hf", "transformers VLM for model=hf (hub name or local folder: "
                         "LLaVA, LLaVA-NeXT, BLIP-2, InstructBLIP, Idefics3/SmolVLM, PaliGemma, Qwen2-VL, "
                         "Qwen2.5-VL) or model=hf_llava"),
        "text_encoder": Param("stack", "f_text: the stack's own (all-MiniLM-L6-v2 for offline, hf and hf_llava, n-grams "
                              "for tiny), minilm, ngram, or a CLIP checkpoint (its text tower; the paper's is "
                              "openai/clip-vit-base-patch16) or sentence-transformers model, by hub name or folder"),
        "visual_tokens": Param(4, "visual tokens fed to the LM (pooled encoder grid)", choices=(1, 4, 9, 16, 25, 36, 49)),
        "image_size": Param(224, "encoder input resolution (offline stack)", low=32),
        "lora_r": Param(0, "LoRA rank on the LM (0 = off, as in the paper)", low=0),
        "precision": Param("auto", "frozen LM weights; auto: bf16 where this machine's bf16 matrix products "
                           "run >= 1.25x fp32's (timed once at the LM's shape, cached), else fp32; the projection "
                           "always trains in fp32",
                           choices=("auto", "fp32", "bf16")),
        "max_new_tokens": Param(16, "generation limit per answer", low=1),
        "eval_batch_size": Param(0, "images per generation batch; 0 = 256 on a CPU, and on a GPU as many as "
                                 "a quarter of its free memory holds KV caches for, at most 32,768 (a decode "
                                 "step's fixed cost, not its arithmetic, bounds small batches there)", low=0,
                                 affects_results=False),
        "compile": Param(False, "torch.compile the frozen LM's MLPs and norms (fused elementwise work): on an H200 "
                         "1.4x training samples/s at batch 4,096 and 1.3x evaluation at 32,768, slower at batch 16; "
                         "no gain on a CPU; the first steps pay the compilation", affects_results=False),
        "decode": Param("dynamic", "greedy decoding: dynamic (finished rows leave the batch, the KV cache grows a "
                        "step at a time), static (one fixed-size KV cache for every row until all have finished) or "
                        "graphs (static, the one-token step through torch.compile: replayed as a CUDA graph on a "
                        "GPU); the same answers", choices=("dynamic", "static", "graphs"), affects_results=False),
        "question": Param("after_image", "where the question stands: after the image (MiniGPT-4's order) or before it "
                          "(a longer constant prompt prefix, computed once: ~1.3x faster on CPU)",
                          choices=("after_image", "before_image")),
        "memory": Param(0, "exemplar images kept in total, class-balanced (0 = none, as in the paper)", low=0),
        "feature_replay": Param(False, "replay stored encoder features of old classes (exemplar-free)"),
        "replay_kind": Param("samples", "feature replay: stored vectors or per-class Gaussian", choices=("samples", "gaussian")),
        "replay_per_class": Param(20, "feature vectors stored (or sampled) per old class", low=1),
        "feature_cache": Param("auto", "encoder features of each image: kept in memory, also on disk, or computed "
                               "anew each time (none); auto = memory where the whole stream's fit in half the free "
                               "memory, else none", choices=("auto", "memory", "disk", "none"), affects_results=False),
    }

    # 28-px doodles upscaled to 112 px give EfficientNet a 4x4 map (pooled to the visual
    # tokens) at a quarter of 224 px's encoder cost.
    protocol_defaults = {"quickdraw": {"image_size": 112}}
    # Built from the settings, or caches: not checkpointed (harness.state saves the rest)
    transient = ("cache", "cache_mode", "alignment", "lm_dtype", "precision_record", "answers", "class_embeddings", "_current")
    # The paper's own recipe (docs/methods.md) for a LLaVA stack, whose projector is already aligned.
    setting_defaults = {f"model={m}": {"lr": 3e-6, "min_lr": 1e-6, "warmup_steps": 200, "epochs": 5, "batch_size": 2}
                        for m in ("hf", "hf_llava")}

    def __init__(self, *, context, hp, plugins=()):
        self.n_seen = 0
        self.memory = ExemplarMemory(max_items=hp["memory"])  # class-balanced random uint8 images
        if hp["memory"]:
            check_budget(self.memory, context.protocol.num_classes, 1, "gmm")
        self.stored_feats: dict[int, torch.Tensor] = {}  # class -> float16 encoder tokens
        self.feat_stats: dict[int, torch.Tensor] = {}  # class -> (2, N, D) float32 mean and std
        super().__init__(context=context, hp=hp, plugins=plugins)
        self.cache_mode = self._cache_mode(hp["feature_cache"])
        self.cache = feature_cache(self.model.encoder_id, self.cache_mode == "disk") if self.cache_mode != "none" else None
        if self.cache_mode == "disk":
            atexit.register(self.cache.save)
        self.alignment = self._align()

    # ---- model and optimizer ---------------------------------------------------------
    def build_model(self):
        p, hp = self.context.protocol, self.hp
        vlm = build_stack(hp["model"], in_channels=p.channels, visual_tokens=hp["visual_tokens"],
                          image_size=hp["image_size"], hf_name=hp["hf_name"])
        # auto: bf16 where this machine's bf16 matrix products clearly beat fp32's, measured (and
        # cached) at the LM's own shape: a training batch of ~31 tokens per answer
        hidden = vlm.lm.get_input_embeddings().weight.shape[1]
        config = getattr(vlm.lm.config, "text_config", vlm.lm.config)
        shape = (hp["batch_size"] * 31, hidden, getattr(config, "intermediate_size", None) or 4 * hidden)
        self.lm_dtype, self.precision_record = lm_precision(hp["precision"], self.context.device, shape)
        vlm.set_lm_dtype(self.lm_dtype)
        if hp["lora_r"]:
            vlm.add_lora(hp["lora_r"])
        if hp["compile"]:
            vlm.compile_pointwise()
        vlm.set_decode(hp["decode"])
        if hp["text_encoder"] != "stack":
            vlm.text_encoder = text_encoder_by_name(hp["text_encoder"])
        vlm.set_question(f"What is this {p.noun} of?", before_image=hp["question"] == "before_image")
        self.answers = vlm.answer_ids([answer_sentence(p.noun, c) for c in self.context.class_names])
        self.class_embeddings = vlm.text_encoder(self.context.class_names)
        return vlm

    def _align(self) -> dict | None:
        hp = self.hp
        kind = hp["align"] if hp["align"] != "auto" else ("disjoint" if hp["model"] == "offline" else "none")
        if kind == "none":
            return None
        if hp["model"] in ("hf", "hf_llava"):
            raise HarnessError("gmm.align=disjoint would retrain the model's pretrained projection from scratch: it is "
                               "already aligned (use gmm.align=none)")
        settings = AlignmentSettings(per_class=hp["align_per_class"], epochs=hp["align_epochs"], lr=hp["align_lr"])
        return aligned_projection(self.model.to(self.device), self.context.protocol, self._encode,
                                  cache_dir() / "alignment", settings, data_root=self.context.data_root,
                                  quiet=self.context.quiet, amp=self._amp, bundled=BUNDLED_ALIGNMENTS)

    def build_optimizer(self, model):
        trainable = [q for q in model.parameters() if q.requires_grad]
        decay = self.hp["weight_decay"]
        if self.hp["decay_biases"]:
            return torch.optim.AdamW(trainable, lr=self.hp["lr"], weight_decay=decay)
        groups = [{"params": [q for q in trainable if q.ndim >= 2], "weight_decay": decay},
                  {"params": [q for q in trainable if q.ndim < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=self.hp["lr"])

    def _before_training_iteration(self, **kwargs):
        if self.hp["lr_schedule"] == "warmup_cosine":
            self.warmup_cosine_per_task(self.hp["warmup_steps"], self.hp["min_lr"])
        super()._before_training_iteration(**kwargs)

    def make_optimizer(self, **kwargs):
        # Avalanche would add every model parameter (135M frozen ones included) to the
        # optimizer; ours holds the trainable ones only. A new task starts from fresh moments.
        self.optimizer.state.clear()

    def _amp(self):
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- features of the frozen encoder, cached per image ----------------------------
    @torch.no_grad()
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.model.encoder.eval()
        dev = next(enc.parameters()).device
        with self._amp():
            return enc(x.to(dev)).float()

    def _cache_mode(self, asked: str) -> str:
        """Where encoder features live. A LLaVA tower's 576 x 1024 tokens are 1.2 MB per image in
        float16, ~71 GB for CIFAR-100: a cache that cannot fit is refused (or, for auto, skipped)
        before any training."""
        images = self.context.images
        if asked == "none" or not images:
            return "none" if asked == "none" else ("memory" if asked == "auto" else asked)
        probe = self._encode(torch.zeros(1, self.context.protocol.channels, 8, 8))
        need = probe[0].numel() * 2 * images  # float16
        free_memory = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        fits = need <= free_memory // 2
        if asked == "auto":
            return "memory" if fits else "none"
        if not fits:
            raise HarnessError(f"gmm.feature_cache={asked}: the encoder features of {images:,} images take "
                               f"{need / 2**30:.1f} GiB, more than half the free memory ({free_memory / 2**30:.1f} "
                               "GiB); use gmm.feature_cache=none (computed anew each time) or fewer visual tokens")
        if asked == "disk":
            free_disk = shutil.disk_usage(cache_dir() if cache_dir().exists() else Path.home()).free
            if need > free_disk:
                raise HarnessError(f"gmm.feature_cache=disk: the encoder features of {images:,} images take "
                                   f"{need / 2**30:.1f} GiB, more than the free disk under {cache_dir()} "
                                   f"({free_disk / 2**30:.1f} GiB)")
        return asked

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            return self._encode(x).to(torch.float16).cpu()  # the cache's own form, so results do not depend on it
        return self.cache.get(x, self._encode)

    def _dataset_features(self, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        feats, ys = [], []
        loader = DataLoader(dataset, batch_size=256, shuffle=False)
        for batch in tqdm(loader, desc="encoder features", leave=False, disable=self.context.quiet):
            feats.append(self.features(batch[0]))
            ys.append(torch.as_tensor(batch[1]))
        return torch.cat(feats), torch.cat(ys).long()

    # ---- training --------------------------------------------------------------------
    def make_train_dataloader(self, **kwargs):
        x, y = self._dataset_features(self.adapted_dataset)
        self._current = (x, y)
        rx, ry = self._replay_set()
        if len(ry):
            x, y = torch.cat([x, rx.to(x.dtype)]), torch.cat([y, ry])
        self.train_size = len(y)  # Avalanche drops the dataloader after training; tests read this
        # Batches of answers of one length: no step pays for padding (~1.2 of ~27 tokens a sample)
        self.dataloader = TensorBatches(x, y, self.train_mb_size, shuffle=True, lengths=(self.answers[y] >= 0).sum(1))

    def _replay_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []  # exemplar images are in the training data already (ExemplarReplay)
        for c, f in self.stored_feats.items():
            xs.append(f)
            ys.append(torch.full((len(f),), c))
        for c, stats in self.feat_stats.items():
            n = self.hp["replay_per_class"]
            xs.append((stats[0] + stats[1] * torch.randn(n, *stats.shape[1:])).half())
            ys.append(torch.full((n,), c))
        if not ys:
            return torch.empty(0), torch.empty(0, dtype=torch.long)
        return torch.cat(xs), torch.cat(ys).long()

    def forward(self):
        answers = self.answers[self.mb_y.cpu()]
        answers = answers[:, : int((answers >= 0).sum(1).max())].to(self.device)  # trim shared padding
        with self._amp():
            return self.model.loss(self.mb_x, answers)

    def criterion(self):
        return self.mb_output  # forward() already returns the answer-token cross-entropy

    def learn(self, experience) -> None:
        new = [int(c) for c in experience.classes_in_this_experience]
        self.n_seen = max(self.n_seen, max(new) + 1)
        self.restart_optimizer()  # a new task starts its schedule (and its lr) over
        self.train(experience)
        self._update_memory(experience.dataset, new)
        if self.cache is not None:
            self.cache.save()

    def _update_memory(self, dataset, new: list[int]) -> None:
        hp = self.hp
        x, y = self._current
        if hp["feature_replay"]:
            for c in new:
                fc = x[y == c]
                if hp["replay_kind"] == "samples":
                    g = torch.Generator().manual_seed(self.context.seed * 100003 + c)
                    pick = torch.randperm(len(fc), generator=g)[: hp["replay_per_class"]]
                    self.stored_feats[c] = fc[pick].clone()
                else:
                    f = fc.float()
                    self.feat_stats[c] = torch.stack([f.mean(0), f.std(0, unbiased=len(f) > 1)])
        if hp["memory"]:  # old classes shrink to the new share (a prefix stays random)
            images, labels = materialise(dataset)
            self.memory.update(to_uint8(images), labels, new, self.context.seed)
        self._current = None

    # ---- prediction ------------------------------------------------------------------
    @torch.no_grad()
    def answers_for(self, x: torch.Tensor) -> list[str]:
        self.model.eval()
        feats = self.features(x)
        texts: list[str] = []
        for chunk in feats.split(self._generation_batch(feats.shape[1])):
            with self._amp():
                texts += self.model.generate(chunk.to(self.device), self.hp["max_new_tokens"])
        return texts

    def _generation_batch(self, visual_tokens: int) -> int:
        if self.hp["eval_batch_size"]:
            return self.hp["eval_batch_size"]
        if self.device.type != "cuda":
            return 256  # on 2 CPU cores larger batches gain nothing
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.model.generation_batch(free, visual_tokens, self.hp["max_new_tokens"])

    @torch.no_grad()
    def zero_shot_scores(self, x: torch.Tensor, n_classes: int) -> torch.Tensor:
        # f_text scores the written answer against any class names, trained on or not.
        return text_scores(self.model.text_encoder, self.answers_for(x), self.class_embeddings[:n_classes])

    def class_scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.zero_shot_scores(x, self.n_seen)

    def run_info(self) -> dict[str, Any]:
        return {"lm_dtype": str(self.lm_dtype).removeprefix("torch."), "precision": self.precision_record,
                "alignment": self.alignment,
                "text_encoder": type(self.model.text_encoder).__name__}

    # ---- memory and checkpoints ------------------------------------------------------
    def memory_usage(self) -> tuple[int, int]:
        """(stored items: exemplar images + feature vectors, bytes they take)."""
        count = len(self.memory) + sum(len(v) for v in self.stored_feats.values())
        tensors = [*self.stored_feats.values(), *self.feat_stats.values()]
        return count, self.memory.nbytes + sum(t.numel() * t.element_size() for t in tensors)

    def model_state(self) -> dict[str, torch.Tensor]:
        # Only what trains (projection, LoRA): the frozen encoder and LM (~560 MB) come
        # back from the installed packages, so each task's checkpoint stays a few MB.
        return {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}

    def restore_model(self, state: dict[str, Any], past_experiences: list) -> None:
        self.model.to(self.device)
        missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
        if unexpected or set(state["model"]) != {n for n, p in self.model.named_parameters() if p.requires_grad}:
            raise RuntimeError(f"GMM checkpoint does not match this model's trainable parameters: {unexpected}")
        self.optimizer.load_state_dict(state["optimizer"])

