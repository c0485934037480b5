#!/usr/bin/env python3
"""Float64 numpy reference of LoRA-MGPO (docs/spec.md) and conformance-vector generator.

This file is written directly from the equations of docs/spec.md. It shares
no code with the Rust implementation and must never be derived from it.

Modes
-----
  (default)               generate vectors:  gen_vectors.py --out crates/mgpo-conformance/vectors
  --check-shared DIR      re-run the reference on every vector in DIR and
                          assert every expected quantity within 1e-9
  --check-torch           compare AdamW, clipping, parameter groups and rho = 0
                          MGPO with torch.optim.AdamW(foreach=False) in float64 (1e-12)

Determinism: every vector has a fixed seed; sums of squares use math.fsum
(exactly rounded), matrix products are written as sums of outer products,
and the Gaussian direction uses math.log / math.cos per element, so the
output does not depend on numpy's BLAS or SIMD dispatch.

Decisions where the paper is silent (docs/spec.md states them):
  * grad_norm_ema of a group that has no g_bar yet (every step so far was
    skipped) is written as JSON null under its usual key.
  * The perturbation is removed by restoring a saved copy of the clean
    tensors, so the clean parameters / w0 are restored bit-exactly.
  * Non-finite gradient: the perturbation of that step is still reported in
    expect.perturbation, params and state are unchanged, skipped = true.
  * Schedule: warm-up steps w = max(1, ceil(0.03 * T)), T = number of steps;
    step index k starts at 0, so the first step of a warm-up has lr = 0.
"""

import argparse
import base64
import json
import math
import os
import sys

import numpy as np

# ----------------------------------------------------------------------------
# reference algorithm
# ----------------------------------------------------------------------------

DEFAULT_ADAMW = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
MASK64 = (1 << 64) - 1


def make_config(**kw):
    adamw = dict(DEFAULT_ADAMW)
    adamw.update(kw.pop("adamw", {}))
    gaussian = kw.pop("gaussian_seed", None)
    cfg = {
        "rho": 0.05,
        "beta": 0.9,
        "eps": 1e-12,
        "direction": "ascent",
        "space": "adapter",
        "scope": "global",
        "adaptive_norm": True,
        "max_inv_scale": None,
        "adamw": adamw,
        "max_grad_norm": None,
    }
    for k, v in kw.items():
        if k not in cfg:
            raise KeyError(k)
        cfg[k] = v
    if gaussian is not None:
        cfg["perturbation"] = {"gaussian": {"seed": int(gaussian)}}
    return cfg


def gaussian_seed(cfg):
    """The configured seed of the Gaussian direction, or None (momentum)."""
    p = cfg.get("perturbation", "momentum")
    if p == "momentum":
        return None
    return int(p["gaussian"]["seed"])


def sumsq(x):
    """sum of squares, exactly rounded (platform independent)."""
    return math.fsum((np.asarray(x, dtype=np.float64) ** 2).ravel().tolist())


def matmul(x, y):
    """x @ y as a sum of outer products in a fixed order (no BLAS)."""
    out = np.zeros((x.shape[0], y.shape[1]))
    for k in range(x.shape[1]):
        out += np.outer(x[:, k], y[k, :])
    return out


def mix(z):
    """splitmix64's finaliser on a Python int (docs/spec.md, Gaussian direction)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def tensor_seed(seed, step, tensor):
    return mix(mix(seed ^ ((step * 0xD1B54A32D192ED03) & MASK64)) ^ tensor)


def gaussian_z(seed, n):
    """z(seed, i) for i < n: Box-Muller on two hashed uniforms."""
    out = np.empty(n)
    for i in range(n):
        h = mix(seed ^ mix((i + 0x9E3779B97F4A7C15) & MASK64))
        u1 = (float(h >> 11) + 0.5) / 9007199254740992.0
        u2 = float(mix(h) >> 11) / 9007199254740992.0
        out[i] = math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)
    return out


def adamw_update(p, g, m, v, t, lr, beta1, beta2, eps, wd):
    """torch.optim.AdamW, non-amsgrad, one tensor, step count t >= 1 (in place)."""
    p *= 1.0 - lr * wd
    m *= beta1
    m += (1.0 - beta1) * g
    v *= beta2
    v += (1.0 - beta2) * g * g
    bc1 = 1.0 - beta1 ** t
    bc2 = 1.0 - beta2 ** t
    denom = np.sqrt(v) / math.sqrt(bc2) + eps
    p -= (lr / bc1) * m / denom


class Mgpo:
    """LoRA-MGPO over adapters (A, B, optional W0) and plain trainable tensors.

    Trainable tensors are numbered in layout order: A then B of each adapter
    in listed order, then the plain tensors in listed order; that number is
    the tensor index t of the Gaussian direction."""

    def __init__(self, cfg, adapters, plain=(), param_groups=()):
        self.cfg = cfg
        self.weight = cfg["space"] == "weight"
        self.adapters = [a["name"] for a in adapters]
        self.scale = {a["name"]: float(a["alpha"]) / int(a["rank"]) for a in adapters}
        self.names, self.p, self.ab = [], [], {}
        for a in adapters:
            self.ab[a["name"]] = (len(self.p), len(self.p) + 1)
            self.names += [a["name"] + ".a", a["name"] + ".b"]
            self.p += [np.array(a["a"], dtype=np.float64), np.array(a["b"], dtype=np.float64)]
        self.plain = []
        for pl in plain:
            self.plain.append(len(self.p))
            self.names.append(pl["name"])
            self.p.append(np.array(pl["tensor"], dtype=np.float64))
        assert len(set(self.names)) == len(self.names), "duplicate tensor name"
        self.w0 = {a["name"]: np.array(a["w0"], dtype=np.float64) for a in adapters} if self.weight else {}
        # parameter groups: lr multiplier and weight decay per tensor
        self.lr_scale = [1.0] * len(self.p)
        self.wd = [cfg["adamw"]["weight_decay"]] * len(self.p)
        seen = set()
        for g in param_groups:
            for tn in g["tensors"]:
                assert tn in self.names and tn not in seen, f"param group {g['name']}: {tn}"
                seen.add(tn)
                i = self.names.index(tn)
                self.lr_scale[i] = float(g.get("lr_scale", 1.0))
                if g.get("weight_decay") is not None:
                    self.wd[i] = float(g["weight_decay"])
        self.t = 0  # number of completed (non-skipped) steps
        self.m = [np.zeros_like(x) for x in self.p]
        self.v = [np.zeros_like(x) for x in self.p]
        self.gbar = {g: None for g in self.groups()}
        self.clean = None
        # diagnostics used by the generator's assertions
        self.clamp_bound = False
        self.clip_bound = False
        self.perturbed_groups = []
        self.last_norms = {}

    def groups(self):
        """{group name: (adapter names, plain tensor indices)}; plain tensors
        belong to groups only in adapter space."""
        plain = [] if self.weight else self.plain
        if self.cfg["scope"] == "global":
            return {"global": (list(self.adapters), list(plain))}
        if self.cfg["scope"] == "per_adapter":
            out = {n: ([n], []) for n in self.adapters}
            for i in plain:
                out[self.names[i]] = ([], [i])
            return out
        raise ValueError(self.cfg["scope"])

    def tensors_of(self, adapters, plain):
        return [i for n in adapters for i in self.ab[n]] + list(plain)

    # --- step 1 of the spec: perturb ---------------------------------------
    def perturb(self):
        """Returns (added per trainable tensor, added per W0)."""
        cfg = self.cfg
        eps = cfg["eps"]
        sigma = {"ascent": 1.0, "descent": -1.0}[cfg["direction"]]
        seed = gaussian_seed(cfg)
        assert seed is None or not self.weight, "Gaussian direction is adapter space only"
        self.clean = ([x.copy() for x in self.p], {n: x.copy() for n, x in self.w0.items()})
        add = [np.zeros_like(x) for x in self.p]
        add_w0 = {n: np.zeros_like(x) for n, x in self.w0.items()}
        self.perturbed_groups = []
        self.last_norms = {}
        for gname, (ads, plain) in self.groups().items():
            if self.t == 0:
                continue  # no optimizer state yet
            d = {}
            if self.weight:
                for n in ads:
                    ia, ib = self.ab[n]
                    d[n] = self.scale[n] * (matmul(self.m[ib], self.p[ia]) + matmul(self.p[ib], self.m[ia]))
            elif seed is None:
                for i in self.tensors_of(ads, plain):
                    d[i] = self.m[i].copy()
            else:
                for i in self.tensors_of(ads, plain):
                    s = tensor_seed(seed, self.t + 1, i)
                    d[i] = gaussian_z(s, self.p[i].size).reshape(self.p[i].shape)
            norm = math.sqrt(math.fsum(sumsq(x) for x in d.values()))
            self.last_norms[gname] = norm
            if norm <= eps:
                continue
            if (not cfg["adaptive_norm"]) or self.gbar[gname] is None:
                k = 1.0
            else:
                k = 1.0 / (self.gbar[gname] + eps)
            if cfg["max_inv_scale"] is not None:
                if k > cfg["max_inv_scale"]:
                    self.clamp_bound = True
                k = min(k, cfg["max_inv_scale"])
            self.perturbed_groups.append(gname)
            coef = sigma * cfg["rho"] * k / (norm + eps)
            for key, x in d.items():
                if self.weight:
                    add_w0[key] = coef * x
                else:
                    add[key] = coef * x
        for i in range(len(self.p)):
            self.p[i] = self.p[i] + add[i]
        for n in self.w0:
            self.w0[n] = self.w0[n] + add_w0[n]
        return add, add_w0

    def _restore(self):
        cp, cw = self.clean
        self.p = cp
        self.w0 = cw
        self.clean = None

    # --- step 3 of the spec: step(g) ---------------------------------------
    def step(self, grads, lr):
        """grads: list of arrays in layout order; returns skipped (bool)."""
        cfg = self.cfg
        aw = cfg["adamw"]
        assert self.clean is not None, "perturb() must precede step()"
        g = [np.array(x, dtype=np.float64) for x in grads]
        finite = all(np.all(np.isfinite(x)) for x in g)
        self._restore()
        if not finite:
            return True
        # gradient norms of the raw gradient, per group
        for gname, (ads, plain) in self.groups().items():
            if self.weight:
                parts = []
                for n in ads:
                    ia, ib = self.ab[n]
                    G = self.scale[n] * (matmul(g[ib], self.p[ia]) + matmul(self.p[ib], g[ia]))
                    parts.append(sumsq(G))
                sq = math.fsum(parts)
            else:
                sq = math.fsum(sumsq(g[i]) for i in self.tensors_of(ads, plain))
            gn = math.sqrt(sq)
            if self.gbar[gname] is None:
                self.gbar[gname] = gn
            else:
                self.gbar[gname] = cfg["beta"] * self.gbar[gname] + (1.0 - cfg["beta"]) * gn
        # clipping (torch.nn.utils.clip_grad_norm_), over every trainable tensor
        if cfg["max_grad_norm"] is not None:
            total = math.sqrt(math.fsum(sumsq(x) for x in g))
            coef = min(1.0, cfg["max_grad_norm"] / (total + 1e-6))
            if coef < 1.0:
                self.clip_bound = True
            g = [x * coef for x in g]
        # AdamW, per tensor with its parameter group's lr and weight decay
        self.t += 1
        for i in range(len(self.p)):
            adamw_update(self.p[i], g[i], self.m[i], self.v[i], self.t, lr * self.lr_scale[i],
                         aw["beta1"], aw["beta2"], aw["eps"], self.wd[i])
        return False


# ----------------------------------------------------------------------------
# JSON helpers
# ----------------------------------------------------------------------------

B64_MIN = 1024  # tensors with at least this many entries are written as b64


def num_out(x):
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x


def num_in(x):
    if isinstance(x, str):
        return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}[x]
    return float(x)


def tensor_out(arr):
    arr = np.asarray(arr, dtype=np.float64)
    shape = [int(s) for s in arr.shape]
    if arr.size >= B64_MIN:
        raw = np.ascontiguousarray(arr, dtype="<f8").tobytes()
        return {"shape": shape, "b64": base64.b64encode(raw).decode("ascii")}
    return {"shape": shape, "data": [num_out(x) for x in arr.reshape(-1)]}


def tensor_in(t):
    if "b64" in t:
        raw = base64.b64decode(t["b64"], validate=True)
        return np.frombuffer(raw, dtype="<f8").astype(np.float64).reshape(t["shape"])
    return np.array([num_in(x) for x in t["data"]], dtype=np.float64).reshape(t["shape"])


def tensor_values(t):
    """A tensor's values as a flat list of floats (either encoding)."""
    return tensor_in(t).reshape(-1).tolist()


def expect_of(opt, skipped, add, add_w0, omit_big):
    """The `expect` object of one step. With omit_big, an all-zero
    perturbation of a b64-sized tensor is left out."""
    def keep(x):
        return not (omit_big and x.size >= B64_MIN and not np.any(x))

    e = {"skipped": skipped, "perturbation": {}, "params": {}}
    for n in opt.adapters:
        ia, ib = opt.ab[n]
        if opt.weight:
            if keep(add_w0[n]):
                e["perturbation"][n] = {"w0": tensor_out(add_w0[n])}
        else:
            e["perturbation"][n] = {k: tensor_out(add[i]) for k, i in (("a", ia), ("b", ib)) if keep(add[i])}
        e["params"][n] = {"a": tensor_out(opt.p[ia]), "b": tensor_out(opt.p[ib])}
    if opt.weight:
        e["w0"] = {n: tensor_out(opt.w0[n]) for n in opt.adapters}
    e["grad_norm_ema"] = {g: (None if v is None else float(v)) for g, v in opt.gbar.items()}
    if opt.plain:
        e["plain_perturbation"] = {opt.names[i]: tensor_out(add[i]) for i in opt.plain if keep(add[i])}
        e["plain_params"] = {opt.names[i]: tensor_out(opt.p[i]) for i in opt.plain}
    return e


def run_vector(cfg, adapters, steps, plain=(), param_groups=(), omit_big=False, trace=None):
    """adapters: list of {name, alpha, rank, a, b, w0?}; plain: list of
    {name, tensor}; steps: list of {lr, grads: {adapter: {a, b}},
    plain_grads: {name: array}}. Returns (expects, optimizer)."""
    opt = Mgpo(cfg, adapters, plain, param_groups)
    expects = []
    for st in steps:
        add, add_w0 = opt.perturb()
        if trace is not None:
            trace.append((list(opt.perturbed_groups), dict(opt.last_norms)))
        grads = []
        for n in opt.adapters:
            grads += [st["grads"][n]["a"], st["grads"][n]["b"]]
        grads += [st.get("plain_grads", {})[opt.names[i]] for i in opt.plain]
        skipped = opt.step(grads, st["lr"])
        expects.append(expect_of(opt, skipped, add, add_w0, omit_big))
    return expects, opt


def vector_json(name, description, cfg, adapters, plain, param_groups, steps, expects, tolerances):
    adapters_j = []
    for a in adapters:
        aj = {"name": a["name"], "alpha": float(a["alpha"]), "rank": int(a["rank"]),
              "a": tensor_out(a["a"]), "b": tensor_out(a["b"])}
        if cfg["space"] == "weight":
            aj["w0"] = tensor_out(a["w0"])
        adapters_j.append(aj)
    steps_j = []
    for st, e in zip(steps, expects):
        sj = {"lr": float(st["lr"]),
              "grads": {a["name"]: {k: tensor_out(st["grads"][a["name"]][k]) for k in ("a", "b")}
                        for a in adapters}}
        if plain:
            sj["plain_grads"] = {p["name"]: tensor_out(st["plain_grads"][p["name"]]) for p in plain}
        sj["expect"] = e
        steps_j.append(sj)
    v = {"name": name, "description": description, "config": cfg, "adapters": adapters_j}
    if plain:
        v["plain"] = [{"name": p["name"], "tensor": tensor_out(p["tensor"])} for p in plain]
    if param_groups:
        v["param_groups"] = param_groups
    v["steps"] = steps_j
    v["tolerances"] = tolerances
    return v


def dumps(obj):
    return json.dumps(obj, allow_nan=False) + "\n"


def load_vector(path):
    with open(path) as f:
        d = json.load(f)
    adapters = []
    for a in d["adapters"]:
        ad = {"name": a["name"], "alpha": a["alpha"], "rank": a["rank"],
              "a": tensor_in(a["a"]), "b": tensor_in(a["b"])}
        if "w0" in a:
            ad["w0"] = tensor_in(a["w0"])
        adapters.append(ad)
    plain = [{"name": p["name"], "tensor": tensor_in(p["tensor"])} for p in d.get("plain", [])]
    steps = []
    for s in d["steps"]:
        steps.append({"lr": s.get("lr", d["config"]["adamw"]["lr"]),
                      "grads": {n: {k: tensor_in(t) for k, t in gd.items()} for n, gd in s["grads"].items()},
                      "plain_grads": {n: tensor_in(t) for n, t in s.get("plain_grads", {}).items()}})
    return d, adapters, plain, d.get("param_groups", []), steps


# ----------------------------------------------------------------------------
# --check-shared
# ----------------------------------------------------------------------------

class Mismatch(AssertionError):
    pass


def is_tensor(x):
    return isinstance(x, dict) and "shape" in x and ("data" in x or "b64" in x)


def compare(got, want, path, tol, stats):
    """Every quantity in `want` is in `got` and agrees within tol (abs + rel);
    `got` may hold more (a vector may leave a quantity out)."""
    if is_tensor(want):
        if not is_tensor(got) or list(got["shape"]) != list(want["shape"]):
            raise Mismatch(f"{path}: shape differs")
        compare(tensor_values(got), tensor_values(want), path + ".data", tol, stats)
    elif isinstance(want, dict):
        if not isinstance(got, dict) or not set(want) <= set(got):
            raise Mismatch(f"{path}: keys {sorted(got) if isinstance(got, dict) else got} lack some of {sorted(want)}")
        for k in want:
            compare(got[k], want[k], f"{path}.{k}", tol, stats)
    elif isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            raise Mismatch(f"{path}: length differs")
        for i, (x, y) in enumerate(zip(got, want)):
            compare(x, y, f"{path}[{i}]", tol, stats)
    elif isinstance(want, bool) or want is None:
        if got is not want and got != want:
            raise Mismatch(f"{path}: {got!r} != {want!r}")
    elif isinstance(want, (int, float, str)):
        x, y = num_in(got), num_in(want)
        if math.isnan(y) or math.isinf(y):
            ok = (math.isnan(x) and math.isnan(y)) or x == y
        else:
            ok = abs(x - y) <= tol + tol * abs(y)
            stats["max_abs"] = max(stats["max_abs"], abs(x - y))
        stats["n"] += 1
        if not ok:
            raise Mismatch(f"{path}: got {x!r}, want {y!r}")
    else:
        raise Mismatch(f"{path}: unexpected type {type(want)}")


def check_shared(directory, tol=1e-9):
    files = sorted(f for f in os.listdir(directory) if f.endswith(".json"))
    if not files:
        print(f"no vectors in {directory}", file=sys.stderr)
        return 1
    failed = 0
    for f in files:
        d, adapters, plain, groups, steps = load_vector(os.path.join(directory, f))
        expects, _ = run_vector(d["config"], adapters, steps, plain, groups)
        stats = {"n": 0, "max_abs": 0.0}
        try:
            if len(expects) != len(d["steps"]):
                raise Mismatch("step count")
            for i, (got, s) in enumerate(zip(expects, d["steps"])):
                compare(got, s["expect"], f"steps[{i}].expect", tol, stats)
            print(f"PASS {f}: {len(steps)} steps, {stats['n']} values, max |diff| {stats['max_abs']:.3e}")
        except Mismatch as e:
            failed += 1
            print(f"FAIL {f}: {e}")
    print(f"check-shared: {len(files) - failed}/{len(files)} passed (tol {tol:g} abs + rel)")
    return 1 if failed else 0


# ----------------------------------------------------------------------------
# --check-torch
# ----------------------------------------------------------------------------

def check_torch(tol=1e-12):
    try:
        import torch
    except Exception as e:  # fail loudly, never skip
        print(f"FAIL check-torch: cannot import torch: {e!r}", file=sys.stderr)
        return 1
    torch.set_default_dtype(torch.float64)
    print(f"torch {torch.__version__}, numpy {np.__version__}")

    def close(x, y):
        return np.all(np.abs(x - y) <= tol + tol * np.abs(y))

    failures = 0

    def report(label, ok, maxdiff):
        nonlocal failures
        print(f"{'PASS' if ok else 'FAIL'} {label}: max |diff| {maxdiff:.3e}")
        if not ok:
            failures += 1

    # 1. plain AdamW (optionally with clipping) vs torch, several tensors, varying lr
    for seed in range(4):
        rng = np.random.default_rng(1000 + seed)
        shapes = [(3, 5), (4,), (2, 2, 3), (6, 1)]
        wd = [0.01, 0.1, 0.05, 0.2][seed]
        betas = [(0.9, 0.999), (0.8, 0.999), (0.5, 0.99), (0.9, 0.95)][seed]
        clip = [None, 1.0, 0.3, None][seed]
        ps = [rng.normal(size=s) for s in shapes]
        tps = [torch.nn.Parameter(torch.tensor(p.copy(), dtype=torch.float64)) for p in ps]
        opt = torch.optim.AdamW(tps, lr=1e-3, betas=betas, eps=1e-8, weight_decay=wd,
                                amsgrad=False, foreach=False)
        ms = [np.zeros_like(p) for p in ps]
        vs = [np.zeros_like(p) for p in ps]
        maxdiff = 0.0
        ok = True
        for t in range(1, 21):
            lr = float(rng.uniform(1e-4, 5e-2))
            gs = [rng.normal(size=s) * float(rng.uniform(0.1, 3.0)) for s in shapes]
            if clip is not None:
                total = math.sqrt(math.fsum(sumsq(g) for g in gs))
                coef = min(1.0, clip / (total + 1e-6))
                gs_ref = [g * coef for g in gs]
            else:
                gs_ref = gs
            for p, g, m, v in zip(ps, gs_ref, ms, vs):
                adamw_update(p, g, m, v, t, lr, betas[0], betas[1], 1e-8, wd)
            for tp, g in zip(tps, gs):
                tp.grad = torch.tensor(g.copy(), dtype=torch.float64)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(tps, clip, foreach=False)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            for p, tp in zip(ps, tps):
                tv = tp.detach().numpy()
                maxdiff = max(maxdiff, float(np.max(np.abs(p - tv))))
                ok = ok and close(p, tv)
        report(f"adamw seed {seed} (wd {wd}, betas {betas}, clip {clip}, 20 steps, varying lr)", ok, maxdiff)

    # 2. rho = 0 MGPO == torch AdamW (adapter and weight space, both scopes,
    #    with plain tensors), with one parameter group or with two: the second
    #    group as torch param group {lr: lr_scale * lr, weight_decay}
    combos = [("adapter", "global", "ascent", None, False), ("adapter", "per_adapter", "descent", 1.0, False),
              ("weight", "per_adapter", "descent", None, False), ("weight", "global", "ascent", 0.5, False),
              ("adapter", "global", "ascent", 1.0, True), ("weight", "per_adapter", "descent", 1.0, True),
              ("adapter", "per_adapter", "ascent", None, True)]
    for ci, (space, scope, direction, clip, two_groups) in enumerate(combos):
        rng = np.random.default_rng(2000 + ci)
        adapters = random_adapters(rng, [("q", 4, 8.0, 6, 5), ("v", 2, 4.0, 3, 4), ("o", 1, 2.0, 5, 2)],
                                   weight=True)
        plain = [{"name": "head", "tensor": rng.normal(size=(3, 4))},
                 {"name": "ln.bias", "tensor": rng.normal(size=(5,))}] if two_groups else []
        wd = 0.05
        groups = [{"name": "no_decay", "lr_scale": 0.5, "weight_decay": 0.0,
                   "tensors": ["ln.bias", "v.b", "q.a"]}] if two_groups else []
        cfg = make_config(rho=0.0, direction=direction, space=space, scope=scope,
                          max_inv_scale=10.0, max_grad_norm=clip,
                          adamw={"weight_decay": wd, "beta1": 0.85})
        mg = Mgpo(cfg, adapters, plain, groups)
        tps = [torch.nn.Parameter(torch.tensor(x.copy())) for x in mg.p]
        in_group = [i for i, n in enumerate(mg.names) if groups and n in groups[0]["tensors"]]
        rest = [i for i in range(len(tps)) if i not in in_group]
        torch_groups = [{"params": [tps[i] for i in rest], "weight_decay": wd, "scale": 1.0}]
        if in_group:
            torch_groups.append({"params": [tps[i] for i in in_group], "weight_decay": 0.0, "scale": 0.5})
        opt = torch.optim.AdamW(torch_groups, lr=1e-3, betas=(0.85, 0.999), eps=1e-8,
                                amsgrad=False, foreach=False)
        w0_init = {n: x.copy() for n, x in mg.w0.items()}
        maxdiff = 0.0
        ok = True
        for t in range(20):
            lr = float(rng.uniform(1e-4, 2e-2))
            grads = [rng.normal(size=x.shape) for x in mg.p]
            add, add_w0 = mg.perturb()
            ok = ok and all(not np.any(x) for x in add) and all(not np.any(x) for x in add_w0.values())
            assert not mg.step(grads, lr)
            for tp, g in zip(tps, grads):
                tp.grad = torch.tensor(g.copy())
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(tps, clip, foreach=False)
            for group in opt.param_groups:
                group["lr"] = lr * group["scale"]
            opt.step()
            for p, tp in zip(mg.p, tps):
                tv = tp.detach().numpy()
                maxdiff = max(maxdiff, float(np.max(np.abs(p - tv))))
                ok = ok and close(p, tv)
            if space == "weight":
                ok = ok and all(np.array_equal(mg.w0[n], w0_init[n]) for n in w0_init)
        label = "two param groups (lr_scale 0.5, wd 0 / wd 0.05), plain tensors" if two_groups else "wd 0.05"
        report(f"rho=0 MGPO {space}/{scope}/{direction} clip {clip} == torch AdamW (20 steps, {label})",
               ok, maxdiff)

    print(f"check-torch: {'FAILED' if failures else 'all passed'} (tol {tol:g} abs + rel)")
    return 1 if failures else 0


# ----------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------

def random_adapters(rng, specs, weight, a_scale=0.4, b_scale=0.1, w0_scale=0.5):
    """specs: list of (name, rank, alpha, in, out)."""
    out = []
    for name, r, alpha, din, dout in specs:
        a = {"name": name, "alpha": float(alpha), "rank": int(r),
             "a": rng.normal(size=(r, din)) * a_scale,
             "b": rng.normal(size=(dout, r)) * b_scale}
        w0 = rng.normal(size=(dout, din)) * w0_scale
        if weight:
            a["w0"] = w0
        out.append(a)
    return out


def random_grads(rng, adapters, plain, n_steps, scale=1.0):
    out = []
    for _ in range(n_steps):
        st = {"grads": {a["name"]: {"a": rng.normal(size=a["a"].shape) * scale,
                                    "b": rng.normal(size=a["b"].shape) * scale} for a in adapters}}
        if plain:
            st["plain_grads"] = {p["name"]: rng.normal(size=p["tensor"].shape) * scale for p in plain}
        out.append(st)
    return out


def cosine_schedule(lr, T, warmup_frac=0.03):
    w = max(1, math.ceil(warmup_frac * T))
    out = []
    for k in range(T):
        if k < w:
            out.append(lr * k / w)
        else:
            out.append(lr * 0.5 * (1.0 + math.cos(math.pi * (k - w) / (T - w))))
    return out, w


# Tolerances per dtype (docs/spec.md, "Comparison"): rtol 1e-5 (f32) and
# 1e-12 (f64); atol ten times the smallest atol with which every correct
# backend of the project (ndarray serial and parallel, candle CPU kernels and
# tensor-op path, dfdx, tch, burn host kernels and tensor-op path) passes the
# vector at rtol 1e-6 (f32) or 1e-13 (f64), at least 1e-8 / 1e-16. Measured
# with `mgpo conformance --measure`, which prints these numbers beside the
# vectors'.
def tol(f32_atol, f64_atol):
    return {"f32": {"rtol": 1e-5, "atol": f32_atol}, "f64": {"rtol": 1e-12, "atol": f64_atol}}


TOLERANCES = {
    "paper-nlu": tol(3e-07, 5e-16),
    "paper-nlg": tol(3e-07, 5e-16),
    "trainer-nlu": tol(2e-06, 3e-15),
    "trainer-nlg": tol(2e-06, 3e-15),
    "adapter-per-adapter-descent": tol(3e-07, 1e-16),
    "weight-global-ascent": tol(2e-06, 2e-15),
    "weight-per-adapter-ascent": tol(2e-06, 3e-15),
    "adapter-global-descent": tol(6e-07, 8e-16),
    "no-apn": tol(3e-07, 1e-16),
    "clamp-active": tol(2e-06, 2e-16),
    "clipping-active": tol(3e-07, 4e-16),
    "weight-decay": tol(3e-07, 4e-16),
    "schedule": tol(6e-07, 4e-16),
    "rho-zero": tol(1e-08, 1e-16),
    "zero-momentum": tol(4e-07, 1e-16),
    "nan-first-step": tol(6e-07, 8e-16),
    "inf-later-step": tol(3e-06, 2e-15),
    "many-adapters": tol(2e-06, 3e-15),
    "large-lr": tol(6e-07, 4e-16),
    "global-single": tol(1e-06, 3e-15),
    "per-adapter-single": tol(1e-06, 3e-15),
    "plain-tensors": tol(3e-07, 4e-16),
    "plain-tensors-per-adapter": tol(3e-07, 3e-16),
    "plain-tensors-weight": tol(2e-06, 2e-15),
    "param-groups": tol(6e-07, 9e-16),
    "param-groups-trainer": tol(2e-06, 2e-15),
    "gaussian-global": tol(3e-07, 5e-16),
    "gaussian-per-adapter": tol(6e-07, 6e-16),
    "gaussian-large": tol(4e-08, 1e-16),
    "f32-accumulation-adapter": tol(4e-08, 1e-16),
    "f32-accumulation-weight": tol(6e-08, 2e-16),
}

TWO = [("q", 4, 8.0, 6, 5), ("v", 2, 4.0, 3, 4)]
TWO_B = [("q_proj", 3, 12.0, 5, 4), ("v_proj", 2, 16.0, 4, 3)]
ONE = [("q", 3, 6.0, 4, 5)]
FOUR = [("q", 1, 2.0, 5, 3), ("k", 2, 16.0, 4, 4), ("v", 3, 3.0, 2, 6), ("o", 4, 32.0, 6, 2)]
TRAINER = dict(space="weight", scope="per_adapter", direction="descent", max_inv_scale=10.0,
               max_grad_norm=1.0)
NLG = dict(rho=0.01, beta=0.8, adamw={"beta1": 0.8})


def case(name, seed, description, specs, cfg, n_steps=6, lr=None, grad_scale=1.0, edit=None, check=None,
         plain=(), param_groups=(), build=None):
    return dict(name=name, seed=seed, description=description, specs=specs, cfg=cfg,
                n_steps=n_steps, lr=lr, grad_scale=grad_scale, edit=edit, check=check,
                plain=plain, param_groups=param_groups, tolerances=TOLERANCES[name], build=build)


def _set(steps, step, name, key, index, value):
    steps[step]["grads"][name][key].reshape(-1)[index] = value


def edit_zero_first(steps):
    for st in steps[:2]:
        for d in st["grads"].values():
            for k in d:
                d[k][...] = 0.0


def edit_nan_first(steps):
    _set(steps, 0, "q", "b", 2, math.nan)


def edit_inf_later(steps):
    _set(steps, 2, "v", "a", 1, math.inf)
    _set(steps, 2, "v", "b", 3, -math.inf)


def edit_nan_plain_step3(steps):
    steps[2]["plain_grads"]["head"].reshape(-1)[4] = math.nan


def check_perturbed_from(first_perturbed_step):
    def chk(opt, expects, steps, trace):
        for i, (groups, _) in enumerate(trace):
            want = i + 1 >= first_perturbed_step
            assert bool(groups) == want, f"step {i + 1}: perturbed groups {groups}"
    return chk


def check_clamp(opt, expects, steps, trace):
    assert opt.clamp_bound, "clamp never bound"


def check_clip(opt, expects, steps, trace):
    assert opt.clip_bound, "clipping never bound"


def check_nan_first(opt, expects, steps, trace):
    e0 = expects[0]
    assert e0["skipped"] and all(v is None for v in e0["grad_norm_ema"].values())
    assert not trace[0][0] and not trace[1][0], "no perturbation may exist at steps 1-2"
    assert all(v is not None for v in expects[1]["grad_norm_ema"].values())


def check_inf_later(opt, expects, steps, trace):
    assert [e["skipped"] for e in expects] == [i == 2 for i in range(len(expects))]
    assert expects[2]["params"] == expects[1]["params"]
    assert expects[2]["grad_norm_ema"] == expects[1]["grad_norm_ema"]
    assert expects[3]["perturbation"] == expects[2]["perturbation"]


def check_rho_zero(opt, expects, steps, trace):
    # independent plain AdamW loop on the same data
    aw = opt.cfg["adamw"]
    ps = {a: {k: np.array(v) for k, v in d.items()} for a, d in INITIAL[0].items()}
    ms = {a: {k: np.zeros_like(v) for k, v in d.items()} for a, d in ps.items()}
    vs = {a: {k: np.zeros_like(v) for k, v in d.items()} for a, d in ps.items()}
    for t, (st, e) in enumerate(zip(steps, expects), start=1):
        for a in ps:
            for k in ps[a]:
                adamw_update(ps[a][k], st["grads"][a][k], ms[a][k], vs[a][k], t, st["lr"],
                             aw["beta1"], aw["beta2"], aw["eps"], aw["weight_decay"])
                got = tensor_in(e["params"][a][k])
                assert np.array_equal(got, ps[a][k]), "rho=0 differs from AdamW"
                assert all(x == 0 for x in e["perturbation"][a][k]["data"])


def check_gaussian_skip(opt, expects, steps, trace):
    """A skipped step does not advance the noise: step 4 adds exactly what step 3 added."""
    assert [e["skipped"] for e in expects] == [i == 2 for i in range(len(expects))]
    assert expects[3]["perturbation"] == expects[2]["perturbation"]
    assert expects[3]["plain_perturbation"] == expects[2]["plain_perturbation"]
    assert expects[2]["perturbation"] != expects[1]["perturbation"]
    # the noise is not the momentum: a momentum run differs
    cfg = dict(opt.cfg)
    del cfg["perturbation"]
    mom, _ = run_vector(cfg, INITIAL[1]["adapters"], steps, INITIAL[1]["plain"])
    assert mom[1]["perturbation"] != expects[1]["perturbation"]


def check_weight_plain(opt, expects, steps, trace):
    """Weight space: plain tensors are never perturbed and are in no group."""
    for e in expects:
        for t in e["plain_perturbation"].values():
            assert not any(t["data"])
        assert set(e["grad_norm_ema"]) == set(opt.adapters)


def check_param_groups(lr_scaled, decay_free):
    """The grouped tensors moved differently from a one-group run."""
    def chk(opt, expects, steps, trace):
        for n in lr_scaled:
            assert opt.lr_scale[opt.names.index(n)] != 1.0
        for n in decay_free:
            assert opt.wd[opt.names.index(n)] == 0.0
        assert any(w != 0.0 for w in opt.wd), "one group must decay"
        one, _ = run_vector(opt.cfg, INITIAL[1]["adapters"], steps, INITIAL[1]["plain"])
        assert one[-1]["params"] != expects[-1]["params"]
    return chk


INITIAL = [None, None]  # initial params of the case being generated (for checks)


# --- vectors with large tensors: f32 accumulation must be visible -----------

def naive_f32_sumsq(x):
    """sum x^2 as the naive f32 loop `s += x * x` (sequential, row-major)."""
    x32 = np.asarray(x, dtype=np.float32).reshape(-1)
    return float(np.cumsum(x32 * x32, dtype=np.float32)[-1])


def catastrophic(rng, n, big=1.0, lo=1.6e-4, hi=2.1e-4):
    """One entry `big` first, then n - 1 entries of random sign and magnitude
    in [lo, hi] * big. Summed in f32 in row-major order after the big one,
    each small square is under half an ulp of the running sum and is lost,
    for x and for 0.1 x (the first moment after one step); in f64 every one
    counts. A sum of squares accumulated naively in f32 is off by about
    3.5e-4 relative, far outside the f32 tolerance."""
    x = rng.uniform(lo, hi, size=n) * rng.choice([-1.0, 1.0], size=n) * big
    x[0] = big
    return x


def f32_loss(x):
    """Relative error of the naive f32 sum of squares of x."""
    exact = sumsq(x)
    return abs(naive_f32_sumsq(x) - exact) / exact


def f32_moment(g, beta1):
    """The first moment after one step as an f32 backend holds it."""
    return np.float32(1.0 - beta1) * np.asarray(g, dtype=np.float32)


def build_accumulation_adapter(rng, c):
    """Adapter space: A of 2 x 5000 = 10^4 entries whose gradients carry the
    catastrophic pattern; the momentum after step 1 does too."""
    n = 5000
    adapters = [{"name": "q", "alpha": 4.0, "rank": 2,
                 "a": rng.normal(size=(2, n)) * 0.02, "b": rng.normal(size=(3, 2)) * 0.02}]
    steps = []
    for _ in range(c["n_steps"]):
        ga = catastrophic(rng, 2 * n).reshape(2, n)
        gb = rng.normal(size=(3, 2)) * 1e-6
        steps.append({"grads": {"q": {"a": ga, "b": gb}}})
    return adapters, [], steps


def build_accumulation_weight(rng, c):
    """Weight space, one adapter of rank 1 with out = 10^4, in = 1: the
    gradient of B, and so the momentum of B and the weight-space images
    s (g_B A + B g_A), s (m_B A + B m_A), carry the catastrophic pattern."""
    n = 10_000
    adapters = [{"name": "o", "alpha": 2.0, "rank": 1,
                 "a": np.array([[0.5]]), "b": rng.normal(size=(n, 1)) * 0.05,
                 "w0": rng.normal(size=(n, 1)) * 0.02}]
    steps = []
    for _ in range(c["n_steps"]):
        gb = catastrophic(rng, n).reshape(n, 1)
        ga = np.array([[float(rng.normal()) * 1e-6]])
        steps.append({"grads": {"o": {"a": ga, "b": gb}}})
    return adapters, [], steps


def build_gaussian_large(rng, c):
    """A plain tensor of 100 x 100 beside a small adapter: its noise spans
    more than one block of a blocked backend (index 8192 and beyond)."""
    adapters = random_adapters(rng, [("q", 2, 4.0, 3, 4)], weight=False, a_scale=0.02, b_scale=0.02)
    plain = [{"name": "embed", "tensor": rng.normal(size=(100, 100)) * 0.02}]
    steps = random_grads(rng, adapters, plain, c["n_steps"])
    return adapters, plain, steps


def check_accumulation(tensors):
    """The naive f32 sum of squares of the named step-1 gradients, and of
    the momentum they leave, misses enough to fail the f32 tolerance by a
    factor of ten or more, in g_bar and in the next perturbation."""
    def chk(opt, expects, steps, trace):
        f32 = TOL_OF[0]["f32"]
        beta1 = opt.cfg["adamw"]["beta1"]
        for adapter, key in tensors:
            g = steps[0]["grads"][adapter][key]
            sums = [("gradient", g), ("momentum", f32_moment(g, beta1))]
            if opt.weight:
                # a backend that forms P Q + R S in f32 and sums it naively
                ad0 = next(a for a in INITIAL[1]["adapters"] if a["name"] == adapter)
                after1 = {k: tensor_in(expects[0]["params"][adapter][k]) for k in ("a", "b")}
                ga, gb = (steps[0]["grads"][adapter][k] for k in ("a", "b"))
                # gradient image with the initial A, B; momentum image with A, B after step 1
                for what, (pa, pb), ab in (("weight-space gradient", (ga, gb), ad0),
                                           ("weight-space momentum", (f32_moment(ga, beta1), f32_moment(gb, beta1)), after1)):
                    a32, b32 = (np.asarray(ab[k], dtype=np.float32) for k in ("a", "b"))
                    pa32, pb32 = np.asarray(pa, dtype=np.float32), np.asarray(pb, dtype=np.float32)
                    sums.append((what, pb32 @ a32 + b32 @ pa32))
            for what, x in sums:
                loss = f32_loss(x)
                assert loss > 2.5e-4, f"{adapter}.{key} {what}: naive f32 sum off by only {loss:.2e}"
            # g_bar after step 1 is dominated by this tensor: a relative
            # error of loss / 2 in it against rtol + atol / g_bar
            gb = expects[0]["grad_norm_ema"]
            gbar = max(v for v in gb.values())
            allowed = f32["atol"] + f32["rtol"] * gbar
            assert 0.5 * f32_loss(g) * gbar > 10 * allowed, "g_bar error not visible"
            # the largest perturbation entry of step 2 scales with 1 / ||m||
            pert = [tensor_values(t) for d in expects[1]["perturbation"].values() for t in d.values()]
            big = max(abs(v) for t in pert for v in t)
            allowed = f32["atol"] + f32["rtol"] * big
            assert 0.5 * f32_loss(f32_moment(g, beta1)) * big > 10 * allowed, "perturbation error not visible"
    return chk


TOL_OF = [None]  # tolerances of the case being generated

CASES = [
    case("paper-nlu", 11, "paper, NLU settings (eq. 3-6): adapter space, global scope, ascent, "
         "adaptive norm, no clamp, no clipping; two adapters of different shapes",
         TWO, make_config()),
    case("paper-nlg", 12, "paper, NLG settings: rho 0.01, beta 0.8, beta1 0.8; adapter/global/ascent",
         TWO, make_config(**NLG)),
    case("trainer-nlu", 13, "authors' trainer, NLU: weight space, per-adapter scope, descent, "
         "max_inv_scale 10, max_grad_norm 1.0; two adapters",
         TWO, make_config(**TRAINER)),
    case("trainer-nlg", 14, "authors' trainer, NLG: weight/per_adapter/descent, max_inv_scale 10, "
         "max_grad_norm 1.0, rho 0.01, beta 0.8, beta1 0.8",
         TWO, make_config(**TRAINER, **NLG)),
    case("adapter-per-adapter-descent", 15, "adapter space, per-adapter scope, descent",
         TWO_B, make_config(scope="per_adapter", direction="descent")),
    case("weight-global-ascent", 16, "weight space, global scope (sqrt of sum of G_i^2), ascent",
         TWO_B, make_config(space="weight")),
    case("weight-per-adapter-ascent", 17, "weight space, per-adapter scope, ascent",
         TWO_B, make_config(space="weight", scope="per_adapter")),
    case("adapter-global-descent", 18, "adapter space, global scope, descent",
         TWO_B, make_config(direction="descent")),
    case("no-apn", 19, "adaptive_norm false (momentum-guided perturbation only): k = 1",
         TWO, make_config(adaptive_norm=False)),
    case("clamp-active", 20, "gradients scaled by 1e-3 so 1/(g_bar+eps) > max_inv_scale 10: the "
         "clamp binds; weight/per_adapter/descent",
         TWO, make_config(space="weight", scope="per_adapter", direction="descent", max_inv_scale=10.0),
         grad_scale=1e-3, check=check_clamp),
    case("clipping-active", 21, "max_grad_norm 0.5, smaller than every gradient norm: clipping "
         "binds (g *= c / (total + 1e-6)); g_bar uses the raw gradient",
         TWO, make_config(max_grad_norm=0.5), check=check_clip),
    case("weight-decay", 22, "AdamW weight decay 0.1, lr 0.01", TWO,
         make_config(adamw={"weight_decay": 0.1, "lr": 0.01}), lr=0.01),
    case("schedule", 23, "steps[].lr follows linear warm-up (3% of T rounded up, at least 1 step; "
         "step index k from 0, so step 1 has lr 0) then cosine decay to 0, base lr 0.01, T = 8",
         TWO, make_config(adamw={"lr": 0.01}), n_steps=8, lr="schedule"),
    case("rho-zero", 24, "rho = 0 with weight decay 0.05: params equal plain AdamW, perturbation zero",
         TWO, make_config(rho=0.0, adamw={"weight_decay": 0.05}), check=check_rho_zero),
    case("zero-momentum", 25, "gradients exactly zero at steps 1-2: momentum norm 0 <= eps at steps 2-3, "
         "nothing perturbed; g_bar is 0 after step 2; nonzero gradients from step 3, perturbed from step 4",
         TWO, make_config(), edit=edit_zero_first, check=check_perturbed_from(4)),
    case("nan-first-step", 26, "NaN gradient at step 1: skipped, no optimizer state, g_bar absent "
         "(written as null); step 2 is the first real step (unperturbed, g_bar = ||g||)",
         TWO, make_config(), edit=edit_nan_first, check=check_nan_first),
    case("inf-later-step", 27, "Infinity and -Infinity in adapter v's gradient at step 3 "
         "(per-adapter scope): the whole step is skipped, params and state unchanged, perturbation removed; "
         "step 4 perturbs exactly as step 3 did; weight/per_adapter/descent with clamp 10",
         TWO, make_config(space="weight", scope="per_adapter", direction="descent", max_inv_scale=10.0),
         edit=edit_inf_later, check=check_inf_later),
    case("many-adapters", 28, "four adapters: ranks 1-4, alphas 2/16/3/32, square and non-square; "
         "trainer settings (weight/per_adapter/descent, clamp 10, clipping 1.0)",
         FOUR, make_config(**TRAINER)),
    case("large-lr", 29, "lr 0.05 so parameters move visibly; adapter/global/ascent",
         TWO, make_config(adamw={"lr": 0.05}), lr=0.05),
    case("global-single", 30, "one adapter, global scope, weight space, ascent; same data as "
         "per-adapter-single (results must agree, only the grad_norm_ema key differs)",
         ONE, make_config(space="weight")),
    case("per-adapter-single", 30, "one adapter, per-adapter scope, weight space, ascent; same data "
         "as global-single (results must agree, only the grad_norm_ema key differs)",
         ONE, make_config(space="weight", scope="per_adapter")),
    # --- plain tensors, parameter groups, the Gaussian direction -----------
    case("plain-tensors", 31, "two adapters and two plain trainable tensors (a 3 x 4 head and a 1-D "
         "bias): in adapter space the plain tensors are perturbed along their momentum and share the "
         "global norm and g_bar; clipping 2.0 over every tensor",
         TWO, make_config(max_grad_norm=2.0),
         plain=(("head", (3, 4)), ("ln.bias", (5,)))),
    case("plain-tensors-per-adapter", 32, "adapter space, per-adapter scope: each plain tensor is a "
         "group of its own, keyed by its name; descent",
         TWO_B, make_config(scope="per_adapter", direction="descent"),
         plain=(("head", (2, 3)),)),
    case("plain-tensors-weight", 33, "weight space (trainer settings): plain tensors get AdamW and "
         "clipping but are never perturbed (plain_perturbation all zero) and belong to no group",
         TWO, make_config(**TRAINER), plain=(("head", (3, 4)),), check=check_weight_plain),
    case("param-groups", 34, "two parameter groups: `no_decay` (lr_scale 0.5, weight_decay 0: "
         "biases and LayerNorm-like tensors, and one adapter's B) and the implicit default group "
         "(config weight_decay 0.1); lr follows a warm-up/cosine schedule, which scales both groups; "
         "adapter/global/ascent with clipping 1.0",
         TWO, make_config(max_grad_norm=1.0, adamw={"lr": 0.01, "weight_decay": 0.1}), n_steps=8,
         lr="schedule", plain=(("ln.weight", (6,)), ("ln.bias", (6,)), ("head", (3, 6))),
         param_groups=({"name": "no_decay", "lr_scale": 0.5, "weight_decay": 0.0,
                        "tensors": ["ln.weight", "ln.bias", "v.b"]},),
         check=check_param_groups(["ln.weight", "ln.bias", "v.b"], ["ln.weight", "ln.bias", "v.b"])),
    case("param-groups-trainer", 35, "parameter groups with the trainer settings (weight/per_adapter/"
         "descent, clamp 10, clipping 1.0): `slow` (lr_scale 0.25, decay as configured, 0.05) and "
         "`no_decay` (lr_scale 2, weight_decay 0)",
         TWO, make_config(**TRAINER, adamw={"lr": 0.005, "weight_decay": 0.05}), lr=0.005,
         plain=(("head", (2, 5)), ("head.bias", (2,))),
         param_groups=({"name": "slow", "lr_scale": 0.25, "tensors": ["q.a", "q.b"]},
                       {"name": "no_decay", "lr_scale": 2.0, "weight_decay": 0.0,
                        "tensors": ["head.bias"]}),
         check=check_param_groups(["q.a", "q.b", "head.bias"], ["head.bias"])),
    case("gaussian-global", 36, "Gaussian random direction (seed 7) instead of the momentum: "
         "adapter/global/ascent, two adapters and a plain head; a NaN in the head's gradient at step 3 "
         "skips the step, so step 4 draws the same noise as step 3 (the step number in the seed counts "
         "completed steps)",
         TWO, make_config(gaussian_seed=7), plain=(("head", (3, 4)),), edit=edit_nan_plain_step3,
         check=check_gaussian_skip),
    case("gaussian-per-adapter", 37, "Gaussian random direction (seed 2^63 + 5), per-adapter scope, "
         "descent, clamp 10; the plain tensor is a group of its own",
         TWO_B, make_config(gaussian_seed=(1 << 63) + 5, scope="per_adapter", direction="descent",
                            max_inv_scale=10.0),
         plain=(("head", (2, 3)),)),
    case("gaussian-large", 38, "Gaussian random direction (seed 12345), per-adapter scope, with a "
         "100 x 100 plain tensor: row-major noise indices run past 8192, where blocked backends start "
         "a second block; two steps (the first has no state, so nothing is perturbed)",
         None, make_config(gaussian_seed=12345, scope="per_adapter"), n_steps=2,
         build=build_gaussian_large),
    case("f32-accumulation-adapter", 39, "adapter space, global, ascent: A has 2 x 5000 entries and "
         "its gradient is one entry 1.0 followed by entries of magnitude 1.6e-4 to 2.1e-4; summing "
         "their squares in f32 in row-major order loses every small one (about 3.5e-4 of the sum), so "
         "g_bar and the next step's momentum norm come out wrong by far more than the f32 tolerance; "
         "f64 accumulation gets them right",
         None, make_config(), n_steps=2, build=build_accumulation_adapter, check=check_accumulation([("q", "a")])),
    case("f32-accumulation-weight", 40, "weight space, per-adapter, ascent, W0 updated in place: rank "
         "1, out = 10^4, in = 1; the gradient of B is one entry 1.0 followed by entries of magnitude "
         "1.6e-4 to 2.1e-4, so an f32 sum over the 10^4 rows (of a Gram matrix or of the formed "
         "s (g_B A + B g_A)) loses the small squares: g_bar and the next perturbation of W0 are "
         "visibly wrong",
         None, make_config(space="weight", scope="per_adapter"), n_steps=2,
         build=build_accumulation_weight,
         check=check_accumulation([("o", "b")])),
]


def build_case(c):
    rng = np.random.default_rng(c["seed"])
    cfg = json.loads(json.dumps(c["cfg"]))  # deep copy
    weight = cfg["space"] == "weight"
    if c["build"]:
        adapters, plain, steps = c["build"](rng, c)
    else:
        adapters = random_adapters(rng, c["specs"], weight)
        plain = [{"name": n, "tensor": rng.normal(size=s) * 0.3} for n, s in c["plain"]]
        steps = random_grads(rng, adapters, plain, c["n_steps"], c["grad_scale"])
    if c["edit"]:
        c["edit"](steps)
    if c["lr"] == "schedule":
        lrs, _ = cosine_schedule(cfg["adamw"]["lr"], c["n_steps"])
    else:
        lrs = [cfg["adamw"]["lr"]] * c["n_steps"]
    for st, lr in zip(steps, lrs):
        st["lr"] = lr
    param_groups = [dict(g) for g in c["param_groups"]]
    INITIAL[0] = {a["name"]: {"a": a["a"].copy(), "b": a["b"].copy()} for a in adapters}
    INITIAL[1] = {"adapters": adapters, "plain": plain}
    TOL_OF[0] = c["tolerances"]
    omit_big = c["build"] is not None

    trace = []
    expects, opt = run_vector(cfg, adapters, steps, plain, param_groups, omit_big, trace)
    if weight:
        for e in expects:
            for a in adapters:
                assert np.array_equal(tensor_in(e["w0"][a["name"]]), a["w0"])
        if omit_big:  # W0 comes back exactly; a large one is written once, after the last step
            for e in expects[:-1]:
                e["w0"] = {n: t for n, t in e["w0"].items() if "b64" not in t}
    if c["check"]:
        c["check"](opt, expects, steps, trace)
    return vector_json(c["name"], c["description"], cfg, adapters, plain, param_groups, steps, expects,
                       c["tolerances"])


def generate(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    built = {}
    total = 0
    for c in CASES:
        v = build_case(c)
        text = dumps(v)
        size = len(text.encode())
        limit = 1_000_000 if c["build"] else 60_000
        assert size < limit, f"{c['name']}: {size} bytes"
        total += size
        path = os.path.join(out_dir, c["name"] + ".json")
        with open(path, "w") as f:
            f.write(text)
        built[c["name"]] = v
        print(f"wrote {path} ({size} bytes, {len(v['steps'])} steps)")
    assert total < 4_000_000, f"vectors total {total} bytes"
    # global-single and per-adapter-single must agree
    g, p = built["global-single"], built["per-adapter-single"]
    for sg, sp in zip(g["steps"], p["steps"]):
        eg, ep = sg["expect"], sp["expect"]
        for key in ("perturbation", "params", "w0"):
            compare(eg[key], ep[key], key, 1e-12, {"n": 0, "max_abs": 0.0})
        compare(eg["grad_norm_ema"]["global"], ep["grad_norm_ema"]["q"], "gbar", 1e-12,
                {"n": 0, "max_abs": 0.0})
    print(f"{len(CASES)} vectors, {total} bytes")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    default_out = os.path.join(os.path.dirname(here), "crates", "mgpo-conformance", "vectors")
    ap.add_argument("--out", default=default_out,
                    help="output directory for generated vectors (default: <repo>/crates/mgpo-conformance/vectors)")
    ap.add_argument("--check-shared", metavar="DIR", help="verify the reference against vectors in DIR")
    ap.add_argument("--check-torch", action="store_true", help="verify AdamW / rho=0 against torch")
    args = ap.parse_args(argv)
    if args.check_shared:
        return check_shared(args.check_shared)
    if args.check_torch:
        return check_torch()
    return generate(args.out)


if __name__ == "__main__":
    sys.exit(main())
