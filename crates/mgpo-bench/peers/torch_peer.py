#!/usr/bin/env python3
"""PyTorch peer of `mgpo bench`: the same optimizer work, timed in PyTorch.

What is timed (f32, CPU, torch.set_num_threads(--threads)):

  step variants, on the LoRA tensors `mgpo bench` uses (adapters of A: r x d,
  B: d x r, gradients fixed, two warm-up steps first):
    adamw-fused     torch.optim.AdamW(fused=True).step()
    adamw-foreach   torch.optim.AdamW(foreach=True).step()
    adamw-forloop   torch.optim.AdamW(foreach=False).step()
    mgpo-adapter    the paper's adapter-space MGPO written with foreach ops:
                    ||m|| over all tensors, p += c m, (forward/backward
                    would run here), p -= c m, ||g||, AdamW(fused=True)
    mgpo-weight-w0  the authors' trainer (lora_mgpo/trainer.py), op for op:
                    per adapter the weight-space momentum
                    s (m_B A + B m_A) materialised, isfinite, norm, scaled
                    and added to W0; rebuilt and subtracted after the
                    backward pass; the gradient image s (g_B A + B g_A)
                    materialised for its norm; then AdamW(fused=True)
  weight:           the authors' per-adapter weight-space work alone
                    (no AdamW) on one out x in W0, and the two
                    materialised norms alone
  e2e:              one training step (forward, backward, optimizer) of a
                    LoRA MLP (d x d frozen layers with rank-r adapters,
                    GELU between, MSE loss), AdamW(fused) vs the two MGPOs

Modes:
  --serve           JSON requests on stdin, one per line; one JSON answer
                    per line (what `mgpo bench` uses to alternate its runs
                    with ours in one command)
  --rss KIND        peak-RSS probe: prints one JSON line
  (default)         a stand-alone table for the sizes of --params
"""

import argparse
import json
import math
import os
import sys
import time

import torch

torch.set_grad_enabled(False)

RHO = 0.05
BETA = 0.9
EPS = 1e-12
LR = 1e-4


def lora_shape(n):
    """The split of `mgpo bench` (crates/mgpo-bench/src/sizes.rs)."""
    dim = 64 if n < 100_000 else (1024 if n < 3_000_000 else 4096)
    rank = 8
    per = 2 * rank * dim
    return dim, rank, max(1, (n + per // 2) // per)


def uniform(shape, scale, gen):
    return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * scale


class Adapter:
    """One LoRA adapter: A (r x in), B (out x r), optional W0 (out x in)."""

    def __init__(self, dim, rank, gen, with_w0):
        self.a = uniform((rank, dim), 1.0 / math.sqrt(dim), gen)
        self.b = uniform((dim, rank), 0.01, gen)
        self.a.grad = uniform((rank, dim), 1e-3, gen)
        self.b.grad = uniform((dim, rank), 1e-3, gen)
        self.w0 = torch.zeros((dim, dim)) if with_w0 else None
        self.scale = 2.0  # alpha = 2 r


class StepCase:
    """A LoRA parameter set, its gradients and one optimizer variant."""

    def __init__(self, variant, dim, rank, adapters):
        gen = torch.Generator().manual_seed(0)
        self.variant = variant
        self.adapters = [Adapter(dim, rank, gen, variant == "mgpo-weight-w0") for _ in range(adapters)]
        self.params = [t for ad in self.adapters for t in (ad.a, ad.b)]
        for p in self.params:
            p.requires_grad_(True)
            # requires_grad_ keeps .grad; the step runs under no_grad
        kw = {"lr": LR, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
        if variant == "adamw-foreach":
            kw["foreach"] = True
        elif variant == "adamw-forloop":
            kw["foreach"] = False
        else:
            kw["fused"] = True
        self.opt = torch.optim.AdamW(self.params, **kw)
        self.g_bar = {}
        self.g_bar_global = None
        self.step()
        self.step()

    def momenta(self):
        return [self.opt.state[p]["exp_avg"] for p in self.params]

    # The paper's adapter-space MGPO with PyTorch's foreach ops.
    def mgpo_adapter(self):
        c = 0.0
        if self.opt.state:
            ms = self.momenta()
            n = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(ms))).item()
            k = 1.0 if self.g_bar_global is None else 1.0 / (self.g_bar_global + EPS)
            if n > EPS:
                c = RHO * k / (n + EPS)
                torch._foreach_add_(self.params, ms, alpha=c)
        # ... forward and backward at the perturbed point ...
        grads = [p.grad for p in self.params]
        gn = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).item()
        if not math.isfinite(gn):
            raise RuntimeError("non-finite gradient")
        if c != 0.0:
            torch._foreach_add_(self.params, self.momenta(), alpha=-c)
        self.g_bar_global = gn if self.g_bar_global is None else BETA * self.g_bar_global + (1 - BETA) * gn
        self.opt.step()

    # lora_mgpo/trainer.py, op for op (W0 is module.weight).
    def _perturbation(self, ad):
        st = self.opt.state
        if ad.a not in st:
            return None
        ma, mb = st[ad.a]["exp_avg"], st[ad.b]["exp_avg"]
        direction = ad.scale * (mb.float() @ ad.a.float() + ad.b.float() @ ma.float())
        if not torch.isfinite(direction).all():
            return None
        dn = torch.linalg.vector_norm(direction)
        if dn <= EPS:
            return None
        gb = self.g_bar.get(id(ad))
        scale = direction.new_tensor(1.0) if gb is None else torch.reciprocal(gb + EPS)
        scale = scale.clamp(max=10.0)
        perturb = -RHO * direction / (dn + EPS)
        return (perturb * scale).to(device=ad.w0.device, dtype=ad.w0.dtype)

    def authors_apply(self):
        active = []
        for ad in self.adapters:
            p = self._perturbation(ad)
            if p is None:
                continue
            ad.w0.add_(p)
            active.append(ad)
        return active

    def authors_remove(self, active):
        for ad in reversed(active):
            p = self._perturbation(ad)
            if p is not None:
                ad.w0.sub_(p)

    def authors_ema(self):
        for ad in self.adapters:
            gd = ad.scale * (ad.b.grad.float() @ ad.a.float() + ad.b.float() @ ad.a.grad.float())
            gn = torch.linalg.vector_norm(gd)
            prev = self.g_bar.get(id(ad))
            self.g_bar[id(ad)] = gn if prev is None else BETA * prev + (1 - BETA) * gn

    def mgpo_weight_authors(self):
        active = self.authors_apply()
        # ... forward and backward at the perturbed point ...
        self.authors_remove(active)
        self.authors_ema()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()

    def step(self):
        if self.variant == "mgpo-adapter":
            self.mgpo_adapter()
        elif self.variant == "mgpo-weight-w0":
            self.mgpo_weight_authors()
        else:
            self.opt.step()


class WeightCase:
    """The authors' weight-space work for one adapter with an out x in W0."""

    def __init__(self, out, inn, rank):
        gen = torch.Generator().manual_seed(1)
        self.ad = Adapter(inn, rank, gen, True)
        if out != inn:
            self.ad.b = uniform((out, rank), 0.01, gen)
            self.ad.b.grad = uniform((out, rank), 1e-3, gen)
            self.ad.w0 = torch.zeros((out, inn))
        self.ad.w0.copy_(uniform((out, inn), 0.02, gen))
        self.ma = uniform((rank, inn), 1e-3, gen)
        self.mb = uniform((out, rank), 1e-3, gen)
        self.g_bar = torch.tensor(0.5)

    def direction(self):
        ad = self.ad
        return ad.scale * (self.mb.float() @ ad.a.float() + ad.b.float() @ self.ma.float())

    def perturbation(self):
        d = self.direction()
        if not torch.isfinite(d).all():
            return None
        dn = torch.linalg.vector_norm(d)
        scale = torch.reciprocal(self.g_bar + EPS).clamp(max=10.0)
        return ((-RHO * d / (dn + EPS)) * scale).to(dtype=self.ad.w0.dtype)

    def authors(self):
        p = self.perturbation()
        self.ad.w0.add_(p)
        del p
        p = self.perturbation()
        self.ad.w0.sub_(p)
        del p
        ad = self.ad
        gd = ad.scale * (ad.b.grad.float() @ ad.a.float() + ad.b.float() @ ad.a.grad.float())
        torch.linalg.vector_norm(gd).item()

    def norms(self):
        torch.linalg.vector_norm(self.direction()).item()
        ad = self.ad
        gd = ad.scale * (ad.b.grad.float() @ ad.a.float() + ad.b.float() @ ad.a.grad.float())
        torch.linalg.vector_norm(gd).item()


class LoraLinear(torch.nn.Module):
    """peft's lora.Linear: y = x W0^T + s (x A^T) B^T, W0 frozen."""

    def __init__(self, dim, rank, gen):
        super().__init__()
        self.weight = torch.nn.Parameter(uniform((dim, dim), 1.0 / math.sqrt(dim), gen), requires_grad=False)
        self.lora_a = torch.nn.Parameter(uniform((rank, dim), 1.0 / math.sqrt(dim), gen))
        self.lora_b = torch.nn.Parameter(uniform((dim, rank), 0.01, gen))
        self.scale = 2.0

    def forward(self, x):
        return x @ self.weight.t() + self.scale * ((x @ self.lora_a.t()) @ self.lora_b.t())


class E2ECase:
    """One training step of a LoRA MLP, with AdamW or one of the MGPOs."""

    def __init__(self, variant, dim, rank, layers, tokens):
        gen = torch.Generator().manual_seed(2)
        self.variant = variant
        self.layers = torch.nn.ModuleList([LoraLinear(dim, rank, gen) for _ in range(layers)])
        self.x = uniform((tokens, dim), 1.0, gen)
        self.y = uniform((tokens, dim), 1.0, gen)
        self.params = [p for l in self.layers for p in (l.lora_a, l.lora_b)]
        self.opt = torch.optim.AdamW(self.params, lr=LR, fused=True)
        # The authors' trainer state, reused through StepCase's methods.
        self.adapters = []
        for l in self.layers:
            ad = Adapter.__new__(Adapter)
            ad.a, ad.b, ad.w0, ad.scale = l.lora_a, l.lora_b, l.weight.data, l.scale
            self.adapters.append(ad)
        self.helper = StepCase.__new__(StepCase)
        self.helper.adapters, self.helper.params, self.helper.opt = self.adapters, self.params, self.opt
        self.helper.g_bar, self.helper.g_bar_global = {}, None
        self.step()
        self.step()

    def loss(self):
        h = self.x
        for i, l in enumerate(self.layers):
            h = l(h)
            if i + 1 < len(self.layers):
                h = torch.nn.functional.gelu(h)
        return torch.nn.functional.mse_loss(h, self.y)

    def backward(self):
        self.opt.zero_grad(set_to_none=False)
        with torch.enable_grad():
            self.loss().backward()

    def step(self):
        h = self.helper
        if self.variant == "adamw-fused":
            self.backward()
            self.opt.step()
        elif self.variant == "mgpo-adapter":
            c = 0.0
            if self.opt.state:
                ms = h.momenta()
                n = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(ms))).item()
                k = 1.0 if h.g_bar_global is None else 1.0 / (h.g_bar_global + EPS)
                if n > EPS:
                    c = RHO * k / (n + EPS)
                    torch._foreach_add_(self.params, ms, alpha=c)
            self.backward()
            gn = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in self.params]))).item()
            if c != 0.0:
                torch._foreach_add_(self.params, h.momenta(), alpha=-c)
            h.g_bar_global = gn if h.g_bar_global is None else BETA * h.g_bar_global + (1 - BETA) * gn
            self.opt.step()
        elif self.variant == "mgpo-weight-w0":
            active = h.authors_apply()
            try:
                self.backward()
            finally:
                h.authors_remove(active)
            h.authors_ema()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
        else:
            raise ValueError(f"unknown e2e variant {self.variant}")


def timed(fn, reps):
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def rss_now():
    """(VmRSS, VmHWM) in bytes, from /proc/self/status."""
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                vals[k] = int(v.split()[0]) * 1024
    return vals.get("VmRSS", 0), vals.get("VmHWM", 0)


def reset_peak():
    """Resets VmHWM to the current RSS (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def serve():
    cache = {}
    print(json.dumps({"hello": "torch_peer", "torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            req = json.loads(line)
            op = req["op"]
            if op == "quit":
                print(json.dumps({"ok": True}), flush=True)
                return
            if op == "step":
                key = ("step", req["variant"], req["dim"], req["rank"], req["adapters"])
                if key not in cache:
                    cache[key] = StepCase(req["variant"], req["dim"], req["rank"], req["adapters"])
                case = cache[key]
                times = timed(case.step, req["reps"])
            elif op == "weight":
                key = ("weight", req["out"], req["in"], req["rank"])
                if key not in cache:
                    cache[key] = WeightCase(req["out"], req["in"], req["rank"])
                case = cache[key]
                fn = {"authors": case.authors, "norms": case.norms}[req["what"]]
                times = timed(fn, req["reps"])
            elif op == "e2e":
                key = ("e2e", req["variant"], req["dim"], req["rank"], req["layers"], req["tokens"])
                if key not in cache:
                    cache[key] = E2ECase(req["variant"], req["dim"], req["rank"], req["layers"], req["tokens"])
                times = timed(cache[key].step, req["reps"])
            elif op == "drop":
                cache.clear()
                times = []
            else:
                raise ValueError(f"unknown op {op!r}")
            print(json.dumps({"times_s": times}), flush=True)
        except Exception as e:  # answer, keep serving
            print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)


def rss_probe(kind, params, dim, rank, steps):
    """Peak RSS of `steps` optimizer steps over the memory the inputs already hold."""
    # Warm up on a small case first, so library code pages, OpenMP threads
    # and allocator caches exist before the measured span.
    if kind.startswith("step:") and kind[5:] != "none":
        StepCase(kind[5:], 256, 8, 2)
    elif kind == "weight:authors":
        WeightCase(256, 256, 8).authors()
    if kind.startswith("step:"):
        variant = kind[5:]
        d, r, n = lora_shape(params)
        gen = torch.Generator().manual_seed(0)
        # Tensors first, optimizer (and its state) inside the measured span.
        case = StepCase.__new__(StepCase)
        case.variant = variant
        case.adapters = [Adapter(d, r, gen, variant == "mgpo-weight-w0") for _ in range(n)]
        case.params = [t for ad in case.adapters for t in (ad.a, ad.b)]
        for p in case.params:
            p.requires_grad_(True)
        base, _ = rss_now()
        ok = reset_peak()
        if variant != "none":
            kw = {"lr": LR}
            kw.update({"adamw-foreach": {"foreach": True}, "adamw-forloop": {"foreach": False}}.get(variant, {"fused": True}))
            case.opt = torch.optim.AdamW(case.params, **kw)
            case.g_bar, case.g_bar_global = {}, None
            for _ in range(steps):
                case.step()
        count = sum(p.numel() for p in case.params)
    elif kind.startswith("weight:"):
        case = WeightCase(dim, dim, rank)
        base, _ = rss_now()
        ok = reset_peak()
        fn = {"authors": case.authors, "norms": case.norms, "none": lambda: None}[kind[7:]]
        for _ in range(steps):
            fn()
        count = 2 * dim * rank
    else:
        raise SystemExit(f"unknown probe {kind!r}")
    _, peak = rss_now()
    print(json.dumps({"kind": kind, "params": count, "base_rss": base, "peak_rss": peak, "reset_ok": ok}))


def standalone(args):
    sizes = [int(float(s)) for s in args.params.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.reps} steps")
    print(f"{'variant':16} {'params':>10} {'ms/step':>10} {'ns/param':>9}")
    for n in sizes:
        d, r, a = lora_shape(n)
        for v in ["adamw-fused", "adamw-foreach", "adamw-forloop", "mgpo-adapter"] + (["mgpo-weight-w0"] if n <= 2_000_000 else []):
            case = StepCase(v, d, r, a)
            t = sorted(timed(case.step, args.reps))[args.reps // 2]
            count = 2 * d * r * a
            print(f"{v:16} {count:>10} {t * 1e3:>10.3f} {t * 1e9 / count:>9.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--serve", action="store_true")
    ap.add_argument("--rss", metavar="KIND")
    ap.add_argument("--params", default="1e4,1e6,1e7")
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.serve:
        serve()
    elif args.rss:
        rss_probe(args.rss, int(float(args.params)), args.dim, args.rank, args.steps)
    else:
        standalone(args)


if __name__ == "__main__":
    main()
