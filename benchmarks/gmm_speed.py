"""GMM speed on the default stack: this code against the landed code, in one run.

Measures, on real QuickDraw doodles of quickdraw20_2x10's classes (training images to
train, test images to evaluate):
  encoder     frozen EfficientNet-Lite0 images/s (done once per image, then cached)
  train       projection training samples/s on cached features (batch --batch)
  eval        images/s of GMM's prediction: batched greedy generation with the KV cache,
              each row stopping at its sentence end, f_text, cosine scores
  bare        images/s of a bare decode loop of the same LM on the same machine: one prefill
              as long as the prompt tokens computed per image (the constant prefix is reused),
              then as many one-token steps as the answers took, no stopping, no text: the
              ceiling that evaluation can approach
  reference   images/s of reference-style evaluation (the GMM/MiniGPT-4 script: one image at
              a time, max_new_tokens=300, no early stop), with --ref-images N

`train` and `eval` are measured twice: for this checkout ("current") and for the code at
--baseline (default: the commit before the speed work), whose harness/vlm.py is read from
git and built around the same frozen encoder and LM. Both train on the same images from the
same initial projection, batched as each code batches them (the current GMM groups answers
of one length); both evaluate the projection that "current" trained (copied), so their
answers have the same length; each uses its own default evaluation batch.

    python benchmarks/gmm_speed.py [--device cpu|cuda] [--random-weights] [--steps 40]
        [--batch 16 [256 ...]] [--eval-batch 256 [32768 ...]] [--compile] [--question before_image]
        [--precision fp32 bf16] [--attention auto sdpa] [--decode dynamic static graphs]

On a GPU the batch sizes decide the figures (a step's fixed cost bounds small batches):
results/reference/h200/README.md has the commands and output of one H200.

--random-weights builds the same shapes without the packaged weights (for machines where
the 500 MB converted LM cannot travel): the same speed, meaningless answers.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# No Avalanche import on this path: a bare GPU machine runs the benchmark with torch and
# transformers alone.
import protocols.quickdraw  # noqa: E402,F401  (registers the QuickDraw protocols)
from harness import data as data_mod  # noqa: E402
from harness.batches import TensorBatches  # noqa: E402
from harness.nn import vlm as V  # noqa: E402
from harness.nn.vlm.model import _returned_cache  # noqa: E402
from harness.protocol import get_protocol  # noqa: E402

LANDED = "36bd2cd"  # main before the speed work: fp32, mask, strided LM head, prompt recomputed


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def gemm_gflops(device: torch.device, seconds: float = 1.0) -> float:
    """fp32 GFLOPS of one of the LM's own matrix products (batch-16 training shape): a shared or
    throttled machine shows here first, so figures from different moments can be compared."""
    x, w = torch.randn(496, 576, device=device), torch.randn(1536, 576, device=device)
    torch.nn.functional.linear(x, w)
    sync(device)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        torch.nn.functional.linear(x, w)
        n += 1
        if n % 10 == 0:
            sync(device)
    sync(device)
    return n * 2 * 496 * 576 * 1536 / (time.perf_counter() - t) / 1e9


def random_stack(in_channels: int, visual_tokens: int, image_size: int) -> V.VisionLanguageModel:
    """The offline stack's shapes with random weights (SmolLM2-135M's config, Lite0's layout)."""
    from transformers import LlamaConfig, LlamaForCausalLM

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


def landed_stack(ref: str, current: V.VisionLanguageModel, question: str):
    """The VisionLanguageModel of commit `ref` around the same encoder, LM (float32, as that code
    ran it) and tokenizer, with a copy of the current initial projection; None without git."""
    try:  # a file (carried to a machine without the git history) or a git revision
        src = Path(ref).read_text() if Path(ref).is_file() else subprocess.run(
            ["git", "show", f"{ref}:harness/vlm.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"landed code at {ref} not readable ({exc}): no comparison")
        return None
    spec = importlib.util.spec_from_loader("landed_vlm", loader=None)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    exec(compile(src, f"{ref}:harness/vlm.py", "exec"), mod.__dict__)
    lm = current.lm if current.lm_dtype == torch.float32 else copy.deepcopy(current.lm).float()
    old = mod.VisionLanguageModel(current.encoder, copy.deepcopy(current.proj), lm, current.tokenizer,
                                  current.text_encoder, mod.CHATML, "landed")
    old.set_question(question)
    return old


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=("auto", "fp32", "bf16"),
                    help="the frozen LM's precisions to time, one after the other (as gmm.precision)")
    ap.add_argument("--attention", nargs="+", default=["auto"], choices=("auto", "sdpa"),
                    help="the LM's attention: auto (GMM's: float32 products for bf16 on a CPU, else SDPA) or sdpa "
                    "everywhere; several are timed one after the other")
    ap.add_argument("--decode", nargs="+", default=["dynamic"], choices=("dynamic", "static", "graphs"),
                    help="as gmm.decode; each is timed at every --eval-batch (graphs: the first call of each batch "
                    "size, untimed, compiles and captures)")
    ap.add_argument("--question", default="after_image", choices=("after_image", "before_image"), help="as gmm.question")
    ap.add_argument("--visual-tokens", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=112, help="GMM's QuickDraw setting")
    ap.add_argument("--batch", type=int, nargs="+", default=[16], help="training batches to time (GMM's default: 16)")
    ap.add_argument("--lr", type=float, default=3e-3, help="high enough that answers are sentences after --steps")
    ap.add_argument("--steps", type=int, default=40, help="timed training steps (current code)")
    ap.add_argument("--landed-steps", type=int, default=8, help="timed training steps (landed code)")
    ap.add_argument("--landed-batch", type=int, nargs="+", default=None, help="training batches for the landed code "
                    "(default: --batch; its float32 activations need twice the memory)")
    ap.add_argument("--eval-batch", type=int, nargs="+", default=[256], help="current code (GMM's default: 256)")
    ap.add_argument("--landed-eval-batch", type=int, nargs="+", default=[64], help="landed code (its default: 64)")
    ap.add_argument("--encoder-batch", type=int, default=256, help="images per encoder call")
    ap.add_argument("--images", type=int, default=256, help="test images for eval timing (the test set's "
                    "features repeated where it has fewer)")
    ap.add_argument("--ref-images", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="default 16; with --random-weights the answers' own length (a random LM never writes a "
                    "sentence end, a trained one stops there)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the LM's MLPs and norms "
                    "(VisionLanguageModel.compile_pointwise); the first step of each shape pays the compilation")
    ap.add_argument("--baseline", default=LANDED, help="git revision, or a copy of its harness/vlm.py, to compare "
                    "with ('' skips it)")
    args = ap.parse_args(argv)
    runs = [(p, a) for p in args.precision for a in args.attention]
    summaries = [measure(args, precision, baseline=args.baseline if i == 0 else "", attention=attention)
                 for i, (precision, attention) in enumerate(runs)]
    print("\n" + "\n".join(summaries))


def measure(args, precision: str, baseline: str, attention: str = "auto") -> str:
    """Time one precision and attention of the frozen LM (and the landed code, where `baseline`);
    returns the summary."""
    print(f"\n=== gmm.precision={precision}, attention {attention}", flush=True)
    dev = torch.device(args.device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)

    gemm_start = gemm_gflops(dev)
    data = data_mod.prepare(get_protocol("quickdraw20_2x10"))
    n = max(args.batch) * (args.steps + 1)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(data.train.targets), generator=g)[:n]
    x = torch.stack([data.train[int(i)][0] for i in idx])
    y = torch.tensor([data.train.targets[int(i)] for i in idx])
    tidx = torch.randperm(len(data.test.targets), generator=g)[: args.images]
    xt = torch.stack([data.test[int(i)][0] for i in tidx])
    yt = torch.tensor([data.test.targets[int(i)] for i in tidx])

    t = time.perf_counter()
    vlm = random_stack(1, args.visual_tokens, args.image_size) if args.random_weights else \
        V.build_stack("offline", in_channels=1, visual_tokens=args.visual_tokens, image_size=args.image_size)
    shape = (16 * 31, vlm.lm.config.hidden_size, vlm.lm.config.intermediate_size)  # a training step's tokens
    dtype, record = V.lm_precision(precision, dev, shape)
    _, auto = V.lm_precision("auto", dev, shape)
    print(f"gmm.precision=auto would take {auto['precision']} here: fp32 {auto['gflops']['fp32']:.0f} GFLOPS, bf16 "
          f"{auto['gflops']['bf16']:.0f} on the LM's {'x'.join(map(str, shape))} product ({auto['rule']}; "
          f"{auto['measured_on']})", flush=True)
    vlm.cpu_bf16_attention = attention == "auto"
    vlm.set_lm_dtype(dtype)
    vlm.set_question("What is this drawing of?", before_image=args.question == "before_image")
    vlm.to(dev)
    old = landed_stack(baseline, vlm, "What is this drawing of?") if baseline else None
    if args.compile:
        print(f"compiled {vlm.compile_pointwise()} LM modules (MLPs and norms)", flush=True)
    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'{torch.get_num_threads()} threads'}),"
          f" stack {'random weights' if args.random_weights else 'offline'}, LM {vlm.lm_dtype}, attention "
          f"{vlm.lm.get_decoder().config._attn_implementation}, question "
          f"{args.question}, loaded in {time.perf_counter() - t:.1f}s", flush=True)

    @torch.no_grad()
    def encode(images: torch.Tensor) -> torch.Tensor:
        # Features stay on the device (as GMM's training batches need them there).
        with amp:
            return torch.cat([vlm.encoder.eval()(c.to(dev)).float() for c in images.split(args.encoder_batch)])

    encode(xt)  # warm-up at the timed shapes (oneDNN builds kernels per shape, CUDA loads them on first use)
    sync(dev)
    t = time.perf_counter()
    test_feats = encode(xt)
    sync(dev)
    enc_rate = len(xt) / (time.perf_counter() - t)
    feats = encode(x)
    print(f"encoder     {enc_rate:9.1f} images/s  ({args.image_size}px, {args.visual_tokens} visual tokens, "
          f"batch {args.encoder_batch})", flush=True)
    # A small test set (or a large GPU batch) repeats features: the speed is the same.
    feats, y = feats[torch.arange(n) % len(feats)], y[torch.arange(n) % len(y)]
    test_feats, yt = test_feats[torch.arange(args.images) % len(test_feats)], yt[torch.arange(args.images) % len(yt)]

    answers = vlm.answer_ids([V.answer_sentence("drawing", c) for c in data.class_names])
    if args.max_new_tokens is None:  # a trained model stops at the sentence end, inside its answer's length
        args.max_new_tokens = int((answers >= 0).sum(1).max()) if args.random_weights else 16

    def train(model, steps: int, batch: int, grouped: bool) -> float:
        # Batches as each code forms them: the landed GMM shuffled; this one groups answers of one
        # length (TensorBatches with lengths, as methods/gmm.py does).
        torch.manual_seed(0)
        order = [b[1] for b in TensorBatches(torch.arange(n), torch.arange(n), batch, shuffle=True,
                                             lengths=(answers[y] >= 0).sum(1) if grouped else None)]
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.05)
        model.train()

        def step(i: int) -> float:
            sl = order[i % len(order)]
            a = answers[y[sl]]
            a = a[:, : int((a >= 0).sum(1).max())].to(dev)
            with amp:
                loss = model.loss(feats[sl], a)
            opt.zero_grad()
            loss.backward()
            opt.step()
            return loss.item()

        # Warm-up, untimed: one step of each sequence length the timed steps will see (the GPU
        # loads and picks kernels per shape on first use, which a timed step must not pay).
        first_of_width: dict[int, int] = {}
        for i, sl in enumerate(order):
            first_of_width.setdefault(int((answers[y[sl]] >= 0).sum(1).max()), i)
        for i in first_of_width.values():
            step(i)
        sync(dev)
        t = time.perf_counter()
        for i in range(steps):
            loss = step(i + 1)
        sync(dev)
        rate = steps * batch / (time.perf_counter() - t)
        print(f"train       {rate:9.1f} samples/s  [{model.stack_name}] batch {batch}, last loss {loss:.2f}", flush=True)
        return rate

    rates: dict[str, dict[int, float]] = {"train": {}, "train_landed": {}, "eval": {}, "eval_landed": {}, "bare": {}}
    init = copy.deepcopy(vlm.proj.state_dict())
    for b in args.batch:  # each batch size trains from the same initial projection
        if old is not None and b in (args.landed_batch or args.batch):
            old.proj.load_state_dict(init)
            rates["train_landed"][b] = train(old, args.landed_steps, b, grouped=False)
        vlm.proj.load_state_dict(init)
        rates["train"][b] = train(vlm, args.steps, b, grouped=True)  # the last one is evaluated

    class_emb = vlm.text_encoder(data.class_names)

    @torch.no_grad()
    def evaluate(model, batch: int, decode: str = "dynamic") -> tuple[float, list[str]]:
        model.eval()
        if hasattr(model, "set_decode"):
            model.set_decode(decode)
        with amp:
            model.generate(test_feats[:batch], args.max_new_tokens)  # warm-up at the timed shapes
            sync(dev)
            t = time.perf_counter()
            texts = []
            for c in test_feats.split(batch):
                texts += model.generate(c, args.max_new_tokens)
            scores = V.text_scores(model.text_encoder, texts, class_emb)
            sync(dev)
        rate = len(test_feats) / (time.perf_counter() - t)
        acc = (scores.argmax(1).cpu() == yt).float().mean().item() * 100
        print(f"eval        {rate:9.1f} images/s  [{model.stack_name}] batch {batch}, decode {decode}, max "
              f"{args.max_new_tokens} new tokens, stop at sentence end; e.g. {texts[0]!r}; accuracy {acc:.0f}% after {args.steps + 1} steps",
              flush=True)
        return rate, texts

    def bare_loop(batch: int, texts: list[str]) -> float:
        """The LM alone, as many tokens per image as the prompt (less the reused constant
        prefix) and the answers took."""
        prompt_len = args.visual_tokens + len(vlm.prompt_ids[1]) + (0 if vlm.reuse_prefix else len(vlm.prompt_ids[0]))
        answer_len = sum(len(vlm.tokenizer.encode(s)) for s in texts) / len(texts) + 1  # + the stop token
        steps = min(args.max_new_tokens, max(1, round(answer_len)))
        ids = torch.randint(0, 1000, (batch, prompt_len), device=dev)
        with torch.no_grad(), amp:
            out = vlm.lm(input_ids=ids, use_cache=True, logits_to_keep=1)  # warm-up at the timed shapes
            vlm.lm(input_ids=ids[:, :1], use_cache=True, logits_to_keep=1, **{vlm._cache_kw: _returned_cache(out)})
            sync(dev)
            t = time.perf_counter()
            for _ in range(-(-len(test_feats) // batch)):
                out = vlm.lm(input_ids=ids, use_cache=True, logits_to_keep=1)
                for _ in range(steps - 1):
                    tok = out.logits[:, -1].argmax(-1, keepdim=True)
                    out = vlm.lm(input_ids=tok, use_cache=True, logits_to_keep=1,
                                 **{vlm._cache_kw: _returned_cache(out)})
            sync(dev)
            rate = len(test_feats) / (time.perf_counter() - t)
        print(f"bare        {rate:9.1f} images/s  (the LM alone: batch {batch}, {prompt_len}-token prompt, "
              f"{steps} tokens generated)", flush=True)
        return rate

    for b in args.eval_batch:
        for decode in args.decode:
            rate, texts = evaluate(vlm, b, decode)
            rates["eval"][(b, decode)] = rate
            if decode == args.decode[0]:
                answers_first = texts
            elif texts != answers_first:
                print(f"  decode {decode} wrote other answers than {args.decode[0]}: "
                      f"{sum(a != c for a, c in zip(texts, answers_first))} of {len(texts)} rows differ")
        rates["bare"][b] = bare_loop(b, texts)
        vlm.set_decode("dynamic")
    if old is not None:
        old.proj.load_state_dict(vlm.proj.state_dict())  # same answers, same lengths
        for b in args.landed_eval_batch:
            rates["eval_landed"][b], _ = evaluate(old, b)

    if args.ref_images:
        with torch.no_grad(), amp:
            t = time.perf_counter()
            for i in range(args.ref_images):
                vlm.generate(test_feats[i: i + 1], 300, early_stop=False)
            sync(dev)
        ref = args.ref_images / (time.perf_counter() - t)
        print(f"reference   {ref:9.3f} images/s  (one image at a time, 300 new tokens, no early stop); "
              f"eval / reference: {max(rates['eval'].values()) / ref:.0f}x")

    print(f"\nmachine: fp32 GEMM of the LM's shape {gemm_start:.0f} GFLOPS before, {gemm_gflops(dev):.0f} after")
    tb, (eb, ed) = max(rates["train"], key=rates["train"].get), max(rates["eval"], key=rates["eval"].get)
    best_eval = rates["eval"][(eb, ed)]
    summary = (f"summary ({dev}, LM in {precision}, attention {attention}): train {rates['train'][tb]:.1f} "
               f"samples/s (batch {tb}), eval {best_eval:.1f} images/s (batch {eb}, decode {ed}); fp32 GEMM "
               f"{gemm_start:.0f} GFLOPS")
    print(f"summary ({dev}): train {rates['train'][tb]:.1f} samples/s (batch {tb}), eval {best_eval:.1f} "
          f"images/s (batch {eb}, decode {ed}: {best_eval / rates['bare'][eb]:.2f} of the bare decode loop's "
          f"{rates['bare'][eb]:.1f})")
    if old is not None and rates["train_landed"] and rates["eval_landed"]:
        ltb = max(rates["train_landed"], key=rates["train_landed"].get)
        leb = max(rates["eval_landed"], key=rates["eval_landed"].get)
        print(f"landed code ({baseline}): train {rates['train_landed'][ltb]:.1f} samples/s (batch {ltb}), eval "
              f"{rates['eval_landed'][leb]:.1f} images/s (batch {leb}) -> speed-up "
              f"x{rates['train'][tb] / rates['train_landed'][ltb]:.2f} train, "
              f"x{best_eval / rates['eval_landed'][leb]:.2f} eval (each code at its best batch above)")

    return summary


if __name__ == "__main__":
    main()
