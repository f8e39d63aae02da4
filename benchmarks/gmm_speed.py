"""GMM speed on the default stack: encoder, training and evaluation throughput.

Measures, on real QuickDraw doodles of quickdraw20_2x10's classes:
  encoder     frozen EfficientNet-Lite0 images/s (done once per image, then cached)
  train       projection training samples/s on cached features (batch --batch)
  eval        images/s of GMM's prediction: batched greedy generation with the KV cache,
              stop at the end of the sentence (max --max-new-tokens), f_text, cosine scores
  reference   images/s of reference-style evaluation (the GMM/MiniGPT-4 script: one image at a
              time, max_new_tokens=300, no early stop) on the same model and --ref-images images
and the eval/reference ratio. Training runs first, so generation sees a projection that
already answers with sentences (an untrained one may stop, or ramble, at random).

    python benchmarks/gmm_speed.py [--device cpu|cuda] [--random-weights] [--steps 20]

--random-weights builds the same shapes without the packaged weights (for machines where
the 500 MB converted LM cannot travel): the same speed, meaningless answers.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import data as data_mod  # noqa: E402
from harness.protocol import get_protocol  # noqa: E402
from harness.registry import discover  # noqa: E402
from harness.vlm import answer_sentence, build_stack, text_scores  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_stack(in_channels: int, visual_tokens: int, image_size: int):
    """The offline stack's shapes with random weights (SmolLM2-135M's config, Lite0's layout)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from harness import vlm as V

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)
    lm = LlamaForCausalLM(cfg)
    try:
        from transformers import AutoTokenizer

        tok = V.HFTokenizer(AutoTokenizer.from_pretrained(V.cache_dir() / "smollm2-135m-instruct"))
    except Exception:  # no converted tokenizer here: bytes make longer sequences (slower, conservative)
        tok = V.ByteTokenizer()
    enc = V.EfficientNetTokens(in_channels, visual_tokens, image_size, pretrained=False)
    return V.VisionLanguageModel(enc, torch.nn.Linear(enc.out_dim, 576), lm, tok, V.NgramTextEncoder(), V.CHATML,
                                 "offline-random")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--visual-tokens", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16, help="training batch")
    ap.add_argument("--eval-batch", type=int, default=64)
    ap.add_argument("--encoder-batch", type=int, default=256, help="images per encoder call")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps")
    ap.add_argument("--images", type=int, default=128, help="images for encoder and eval timing")
    ap.add_argument("--ref-images", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)

    discover()
    data = data_mod.prepare(get_protocol("quickdraw20_2x10"))
    n = max(args.images, args.batch * args.steps)
    idx = torch.randperm(len(data.train.targets), generator=torch.Generator().manual_seed(0))[:n]
    x = torch.stack([data.train[int(i)][0] for i in idx])
    y = torch.tensor([data.train.targets[int(i)] for i in idx])

    t = time.perf_counter()
    vlm = random_stack(1, args.visual_tokens, args.image_size) if args.random_weights else \
        build_stack("offline", in_channels=1, visual_tokens=args.visual_tokens, image_size=args.image_size)
    vlm.set_question("What is this drawing of?")
    vlm.to(dev)
    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'{torch.get_num_threads()} threads'}),"
          f" stack {'random weights' if args.random_weights else 'offline'} loaded in {time.perf_counter() - t:.1f}s")

    @torch.no_grad()
    def encode(images: torch.Tensor) -> torch.Tensor:
        # Features stay on the device (as GMM's training batches need them there): a copy
        # back to the host per chunk would time the transfer, not the encoder.
        with amp:
            return torch.cat([vlm.encoder(c.to(dev)).float() for c in images.split(args.encoder_batch)])

    encode(x[:8])  # warm-up
    sync(dev)
    t = time.perf_counter()
    feats = encode(x[: args.images])
    sync(dev)
    enc_rate = args.images / (time.perf_counter() - t)
    if n > args.images:  # the rest of the training batches, untimed
        feats = torch.cat([feats, encode(x[args.images:])])
    print(f"encoder     {enc_rate:9.1f} images/s  ({args.image_size}px, {args.visual_tokens} visual tokens, "
          f"batch {args.encoder_batch})")

    answers = vlm.answer_ids([answer_sentence("drawing", c) for c in data.class_names])
    opt = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05)
    vlm.train()

    def step(i: int) -> float:
        sl = slice((i * args.batch) % n, (i * args.batch) % n + args.batch)
        a = answers[y[sl]]
        a = a[:, : int((a >= 0).sum(1).max())].to(dev)
        with amp:
            loss = vlm.loss(feats[sl].to(dev), a)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    step(0)
    sync(dev)
    t = time.perf_counter()
    for i in range(args.steps):
        loss = step(i + 1)
    sync(dev)
    train_rate = args.steps * args.batch / (time.perf_counter() - t)
    print(f"train       {train_rate:9.1f} samples/s (batch {args.batch}, last loss {loss:.2f})")

    vlm.eval()
    class_emb = vlm.text_encoder(data.class_names)
    ev = feats[: args.images]
    with torch.no_grad(), amp:
        vlm.generate(ev[:2].to(dev), 2)
        sync(dev)
        t = time.perf_counter()
        texts = []
        for c in ev.split(args.eval_batch):
            texts += vlm.generate(c.to(dev), args.max_new_tokens)
        scores = text_scores(vlm.text_encoder, texts, class_emb)
        sync(dev)
    eval_rate = len(ev) / (time.perf_counter() - t)
    acc = (scores.argmax(1) == y[: args.images]).float().mean().item() * 100
    print(f"eval        {eval_rate:9.1f} images/s (batch {args.eval_batch}, max {args.max_new_tokens} new tokens, "
          f"stop at sentence end; e.g. {texts[0]!r}; train-set accuracy after {args.steps + 1} steps {acc:.0f}%)")

    with torch.no_grad(), amp:
        t = time.perf_counter()
        for i in range(args.ref_images):
            vlm.generate(ev[i : i + 1].to(dev), 300, early_stop=False)
        sync(dev)
    ref_rate = args.ref_images / (time.perf_counter() - t)
    print(f"reference   {ref_rate:9.3f} images/s (one image at a time, 300 new tokens, no early stop)")
    print(f"eval / reference: {eval_rate / ref_rate:.0f}x")


if __name__ == "__main__":
    main()
