#!/usr/bin/env python3
"""PyTorch + peft twin of `mgpo finetune --method lora`, for the throughput comparison of docs/finetune.md.

The same loop as crates/mgpo-finetune/src/train.rs, step for step:

  data       WordNet 3.0 noun glosses labelled by supersense, parsed and split
             exactly as mgpo_finetune::data::wordnet (the same SplitMix64
             shuffle per class, seeded by seed ^ label): the same texts in
             the same splits; or --data CSV/JSONL is not supported here.
  tokens     the model's tokenizer.json (transformers' fast tokenizer),
             padded and truncated to --max-len, in chunks of 64.
  model      AutoModelForSequenceClassification (BertForSequenceClassification:
             frozen pretrained pooler, new classifier), dropout 0 (the Rust
             loop has none), float32, torch.set_num_threads(--threads).
  adapters   peft LoRA r / lora_alpha (rsLoRA off) on query, key, value,
             attention.output.dense, intermediate.dense, output.dense of the
             layers --adapt-from.., classifier trained (modules_to_save).
  cache      the frozen bottom (embeddings, layers 0..adapt_from) run once
             per example under no_grad, in chunks of 64, as Rust does.
  steps      batch k = the Rust batch_indices(seed, n, batch, k) (the same
             examples in the same order), the paper's schedule (linear
             warm-up over ceil(3%) of the steps, cosine decay; the Rust
             WarmupCosine), forward through the adapted layers, pooler,
             classifier, mean cross-entropy, backward, torch.optim.AdamW
             (betas 0.9, 0.999, eps 1e-8, weight decay 0: mgpo-core's
             AdamWConfig default), a JSONL line per step.
  validation every --eval-every steps and after the last, in chunks of 128;
             the adapter of the best validation accuracy saved with
             save_pretrained into out/best.
  checkpoint every --checkpoint-every steps (0: at the end only) and at the
             end: adapter, optimizer state, trainer state into out/checkpoint.
  finish     the last adapter into out/adapter, the best one loaded back,
             test accuracy, out/summary.json.

It prints the line `mgpo finetune` prints: steps, best validation accuracy,
test accuracy and training examples per second over the timed loop (steps,
validations and checkpoints, as the Rust Summary's train_seconds).

What differs from the Rust side and cannot be made equal: the random draws
(classifier N(0, 0.02^2) and A Kaiming-uniform come from torch's generator,
not SplitMix64: same distributions, other values), and the attention kernel
(--attn: sdpa, transformers' default, or eager).

  --lengths  prints the token-length percentiles of the chosen splits'
             texts (untruncated) and exits.
  --eval-adapter DIR  loads a peft adapter (one `mgpo finetune` wrote, say)
             with PeftModel.from_pretrained and prints `test: loss L acc A`
             on this script's test split, as `mgpo finetune --eval-only
             --adapter DIR` does on its own: equal figures show that both
             sides read the same texts, labels and tokens.
"""
import argparse
import json
import math
import os
import sys
import time

MASK64 = (1 << 64) - 1

# mgpo_finetune::data::SUPERSENSES and NOUN_LEXNAMES.
SUPERSENSES = [
    "noun.act", "noun.animal", "noun.artifact", "noun.body", "noun.communication",
    "noun.food", "noun.location", "noun.person", "noun.plant", "noun.substance",
]
NOUN_LEXNAMES = [
    "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute", "noun.body", "noun.cognition",
    "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive",
    "noun.object", "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
]
TARGET_MODULES = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


class SplitMix64:
    """mgpo_finetune::rng::SplitMix64, bit for bit."""

    def __init__(self, seed):
        self.x = seed & MASK64

    def next_u64(self):
        self.x = (self.x + 0x9E3779B97F4A7C15) & MASK64
        z = self.x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def shuffle(self, v):
        for i in range(len(v) - 1, 0, -1):
            j = self.next_u64() % (i + 1)
            v[i], v[j] = v[j], v[i]


def wordnet(path, per_class, seed):
    """mgpo_finetune::data::wordnet: (labels, train, val, test), examples as (text, label)."""
    by_class = {s: [] for s in SUPERSENSES}
    with open(path, encoding="utf-8") as f:
        for line in f.read().splitlines():
            if line.startswith("  ") or not line:
                continue
            head, gloss = line.split(" | ", 1)
            fields = head.split(" ")
            name = NOUN_LEXNAMES[int(fields[1]) - 3]
            d = gloss.split('"')[0].strip().rstrip(";").strip()
            if name in by_class:
                by_class[name].append(d)
    train, val, test = [], [], []
    n_tr, n_va, n_te = per_class
    for label, name in enumerate(SUPERSENSES):
        seen, defs = set(), []
        for d in by_class[name]:
            if d not in seen:
                seen.add(d)
                defs.append(d)
        if len(defs) < n_tr + n_va + n_te:
            sys.exit(f"{path}: {name} has {len(defs)} glosses, {n_tr + n_va + n_te} asked")
        SplitMix64(seed ^ label).shuffle(defs)
        ex = [(t, label) for t in defs]
        train += ex[:n_tr]
        val += ex[n_tr:n_tr + n_va]
        test += ex[n_tr + n_va:n_tr + n_va + n_te]
    return SUPERSENSES, train, val, test


def batch_indices(seed, n, batch, k):
    """mgpo_finetune::train::batch_indices."""
    out, cache = [], None
    for i in range(batch):
        q = k * batch + i
        epoch = q // n
        if cache is None or cache[0] != epoch:
            p = list(range(n))
            SplitMix64((seed * 0x9E3779B9 + epoch) & MASK64).shuffle(p)
            cache = (epoch, p)
        out.append(cache[1][q % n])
    return out


def lr_at(peak, total, k):
    """mgpo_core::WarmupCosine::paper(peak, total).lr_at(k)."""
    warmup = math.ceil(total * 0.03)
    if k < warmup:
        return peak * k / warmup
    if k >= total:
        return 0.0
    progress = (k - warmup) / max(total - warmup, 1)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default=os.environ.get("MGPO_MINILM_DIR", "out/models/all-MiniLM-L6-v2"))
    ap.add_argument("--wordnet", default="/usr/share/wordnet/data.noun")
    ap.add_argument("--per-class", default="100,30,50")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--adapt-from", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    ap.add_argument("--out", default="out/finetune-torch")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--lengths", action="store_true")
    ap.add_argument("--eval-adapter")
    args = ap.parse_args()
    per_class = [int(x) for x in args.per_class.split(",")]
    if len(per_class) != 3:
        sys.exit(f"--per-class takes three numbers (train,val,test), not {args.per_class}")

    labels, train, val, test = wordnet(args.wordnet, per_class, args.seed)

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.masking_utils import create_bidirectional_mask

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    if args.lengths:
        for name, split in (("train", train), ("val", val), ("test", test)):
            n = sorted(len(tok(t)["input_ids"]) for t, _ in split)
            q = lambda p: n[min(len(n) - 1, int(math.ceil(p / 100 * len(n))) - 1)]
            over = {m: sum(x > m for x in n) / len(n) for m in (16, 20, 24, 28, 32)}
            print(f"{name}: n {len(n)}, tokens with [CLS]/[SEP]: p50 {q(50)} p90 {q(90)} p95 {q(95)} p99 {q(99)} max {n[-1]}; "
                  + ", ".join(f"> {m}: {100 * f:.1f}%" for m, f in over.items()))
        return

    base = AutoModelForSequenceClassification.from_pretrained(
        args.model_dir, num_labels=len(labels), attn_implementation=args.attn,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0,
    )
    n_layers = base.config.num_hidden_layers
    if args.eval_adapter:
        pm = PeftModel.from_pretrained(base, args.eval_adapter).eval()
        with torch.no_grad():
            x = tok([t for t, _ in test], padding="max_length", truncation=True, max_length=args.max_len, return_tensors="pt")
            y = torch.tensor([y for _, y in test])
            lg = torch.cat([pm(input_ids=x["input_ids"][i:i + 128], attention_mask=x["attention_mask"][i:i + 128]).logits for i in range(0, len(y), 128)])
        print(f"test: loss {torch.nn.functional.cross_entropy(lg, y).item():.4f} acc {(lg.argmax(-1) == y).float().mean().item():.4f}")
        return
    cfg = LoraConfig(
        r=args.rank, lora_alpha=args.alpha, use_rslora=False, target_modules=TARGET_MODULES,
        layers_to_transform=list(range(args.adapt_from, n_layers)), layers_pattern="layer",
        lora_dropout=0.0, bias="none", task_type="SEQ_CLS",
    )
    pm = get_peft_model(base, cfg)
    model = pm.base_model.model
    bert = model.bert
    layers = bert.encoder.layer

    def mask_for(h, m):
        return create_bidirectional_mask(config=bert.config, inputs_embeds=h, attention_mask=m)

    def features(split):
        hs, ms = [], []
        with torch.no_grad():
            for i in range(0, len(split), 64):
                enc = tok([t for t, _ in split[i:i + 64]], padding="max_length", truncation=True, max_length=args.max_len, return_tensors="pt")
                h = bert.embeddings(input_ids=enc["input_ids"], token_type_ids=torch.zeros_like(enc["input_ids"]))
                m = mask_for(h, enc["attention_mask"])
                for layer in layers[:args.adapt_from]:
                    h = layer(h, m)
                hs.append(h)
                ms.append(enc["attention_mask"])
        return torch.cat(hs), torch.cat(ms), torch.tensor([y for _, y in split])

    def logits(h, m):
        mm = mask_for(h, m)
        for layer in layers[args.adapt_from:]:
            h = layer(h, mm)
        return model.classifier(bert.pooler(h))

    def evaluate(f):
        x, m, y = f
        loss, right = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(y), 128):
                lg = logits(x[i:i + 128], m[i:i + 128])
                yy = y[i:i + 128]
                loss += torch.nn.functional.cross_entropy(lg, yy).item() * len(yy)
                right += (lg.argmax(-1) == yy).sum().item()
        return loss / len(y), right / len(y)

    t0 = time.perf_counter()
    tr, va, te = features(train), features(val), features(test)
    if not args.quiet:
        print(f"data: {len(labels)} labels, train {len(train)} / val {len(val)} / test {len(test)}; "
              f"frozen layers 0..{args.adapt_from} cached in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "log.jsonl")
    open(log_path, "w").close()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    state = {"step": 0, "best_val_acc": -math.inf, "best_step": 0}

    def log(line):
        with open(log_path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def checkpoint():
        d = os.path.join(args.out, "checkpoint")
        pm.save_pretrained(d)
        torch.save(opt.state_dict(), os.path.join(d, "optimizer.pt"))
        with open(os.path.join(d, "trainer.json"), "w") as f:
            json.dump(state, f)

    pm.train()
    start = time.perf_counter()
    x, m, y = tr
    for k in range(args.steps):
        lr = lr_at(args.lr, args.steps, k)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.tensor(batch_indices(args.seed, len(y), args.batch, k))
        xb, mb, yb = x[idx], m[idx], y[idx]
        lg = logits(xb, mb)
        loss = torch.nn.functional.cross_entropy(lg, yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        acc = (lg.argmax(-1) == yb).sum().item() / len(yb)
        state["step"] = k + 1
        log({"step": k + 1, "kind": "train", "loss": loss.item(), "acc": acc, "lr": lr, "skipped": False})
        if (k + 1) % args.eval_every == 0 or k + 1 == args.steps:
            vl, vacc = evaluate(va)
            log({"step": k + 1, "kind": "val", "loss": vl, "acc": vacc})
            if not args.quiet:
                print(f"step {k + 1}: val loss {vl:.4f} acc {vacc:.4f}", file=sys.stderr)
            if vacc > state["best_val_acc"]:
                state["best_val_acc"], state["best_step"] = vacc, k + 1
                pm.save_pretrained(os.path.join(args.out, "best"))
        if args.checkpoint_every > 0 and (k + 1) % args.checkpoint_every == 0:
            checkpoint()
    secs = time.perf_counter() - start

    checkpoint()
    pm.save_pretrained(os.path.join(args.out, "adapter"))
    set_peft_model_state_dict(pm, load_file(os.path.join(args.out, "best", "adapter_model.safetensors")))
    pm.eval()
    test_loss, test_acc = evaluate(te)
    eps = args.steps * args.batch / max(secs, 1e-9)
    summary = {"steps": args.steps, "best_val_acc": state["best_val_acc"], "best_step": state["best_step"], "test_acc": test_acc,
               "test_loss": test_loss, "train_seconds": secs, "examples_per_second": eps}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"steps {args.steps}: best val acc {state['best_val_acc']:.4f} at step {state['best_step']}, test acc {test_acc:.4f} "
          f"(loss {test_loss:.4f}); {eps:.1f} examples/s; adapter in {os.path.join(args.out, 'best')} [torch {torch.__version__}, attn {args.attn}]")


if __name__ == "__main__":
    main()
