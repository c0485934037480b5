#!/usr/bin/env python3
"""Float64 numpy reference of LoRA-MGPO (SPEC.md) and conformance-vector generator.

This file is written directly from the equations of SPEC.md. It shares no
code with the Rust implementation and must never be derived from it.

Modes
-----
  (default)               generate vectors:  gen_vectors.py --out conformance/vectors
  --check-shared DIR      re-run the reference on every vector in DIR and
                          assert all expected quantities within 1e-9
  --check-torch           compare the AdamW / clipping / rho=0 paths with
                          torch.optim.AdamW(foreach=False) in float64 (1e-12)

Decisions where SPEC is silent (see also tools/README.md):
  * grad_norm_ema of a group that has no g_bar yet (every step so far was
    skipped, e.g. a non-finite gradient at step 1) is written as JSON null
    under its usual key ({"global": null} or {"<adapter>": null}); the key
    is never omitted.
  * The perturbation is removed by restoring a saved copy of the clean
    tensors, so the clean parameters / w0 are restored bit-exactly.
  * Non-finite gradient: the perturbation of that step is still reported in
    expect.perturbation (it was added at step 1 of that step), params and
    state are unchanged, skipped = true.
  * Schedule: warm-up steps w = max(1, ceil(0.03 * T)), T = number of steps;
    step index k starts at 0, so the first step of a warm-up has lr = 0.
  * Free-form notes go into `description` (SPEC defines no `notes` field).
"""

import argparse
import json
import math
import os
import sys

import numpy as np

# ----------------------------------------------------------------------------
# reference algorithm
# ----------------------------------------------------------------------------

DEFAULT_ADAMW = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}


def make_config(**kw):
    adamw = dict(DEFAULT_ADAMW)
    adamw.update(kw.pop("adamw", {}))
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
    return cfg


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
    """One LoRA-MGPO optimizer over a list of adapters (plain and explicit)."""

    def __init__(self, cfg, adapters):
        self.cfg = cfg
        self.names = [a["name"] for a in adapters]
        self.scale = {a["name"]: float(a["alpha"]) / int(a["rank"]) for a in adapters}
        self.p = {a["name"]: {"a": np.array(a["a"], dtype=np.float64),
                              "b": np.array(a["b"], dtype=np.float64)} for a in adapters}
        self.weight = cfg["space"] == "weight"
        self.w0 = {}
        if self.weight:
            self.w0 = {a["name"]: np.array(a["w0"], dtype=np.float64) for a in adapters}
        self.t = 0  # number of non-skipped steps (all tensors step together)
        self.m = {n: {k: np.zeros_like(x) for k, x in d.items()} for n, d in self.p.items()}
        self.v = {n: {k: np.zeros_like(x) for k, x in d.items()} for n, d in self.p.items()}
        self.gbar = {g: None for g in self.groups()}
        self.clean = None
        # diagnostics used by the generator's assertions
        self.clamp_bound = False
        self.clip_bound = False
        self.perturbed_groups = []

    def groups(self):
        if self.cfg["scope"] == "global":
            return {"global": list(self.names)}
        if self.cfg["scope"] == "per_adapter":
            return {n: [n] for n in self.names}
        raise ValueError(self.cfg["scope"])

    # --- step 1 of SPEC: perturb -------------------------------------------
    def perturb(self):
        cfg = self.cfg
        eps = cfg["eps"]
        sigma = {"ascent": 1.0, "descent": -1.0}[cfg["direction"]]
        # save clean copies
        self.clean = ({n: {k: x.copy() for k, x in d.items()} for n, d in self.p.items()},
                      {n: x.copy() for n, x in self.w0.items()})
        pert = {}
        for n in self.names:
            if self.weight:
                pert[n] = {"w0": np.zeros_like(self.w0[n])}
            else:
                pert[n] = {"a": np.zeros_like(self.p[n]["a"]), "b": np.zeros_like(self.p[n]["b"])}
        self.perturbed_groups = []
        for gname, members in self.groups().items():
            if self.t == 0:
                continue  # no optimizer state yet
            # direction tensors
            d = {}
            for n in members:
                if self.weight:
                    s = self.scale[n]
                    A, B = self.p[n]["a"], self.p[n]["b"]
                    mA, mB = self.m[n]["a"], self.m[n]["b"]
                    d[n] = {"w0": s * (mB @ A + B @ mA)}
                else:
                    d[n] = {"a": self.m[n]["a"].copy(), "b": self.m[n]["b"].copy()}
            norm = math.sqrt(sum(float(np.sum(x * x)) for dd in d.values() for x in dd.values()))
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
            for n in members:
                for key, x in d[n].items():
                    pert[n][key] = sigma * cfg["rho"] * k * x / (norm + eps)
        # apply
        for n in self.names:
            if self.weight:
                self.w0[n] = self.w0[n] + pert[n]["w0"]
            else:
                self.p[n]["a"] = self.p[n]["a"] + pert[n]["a"]
                self.p[n]["b"] = self.p[n]["b"] + pert[n]["b"]
        return pert

    def _restore(self):
        cp, cw = self.clean
        self.p = cp
        self.w0 = cw
        self.clean = None

    # --- step 3 of SPEC: step(g) -------------------------------------------
    def step(self, grads, lr=None):
        """grads: {name: {"a": array, "b": array}}; returns skipped (bool)."""
        cfg = self.cfg
        aw = cfg["adamw"]
        lr = aw["lr"] if lr is None else lr
        assert self.clean is not None, "perturb() must precede step()"
        g = {n: {k: np.array(grads[n][k], dtype=np.float64) for k in ("a", "b")} for n in self.names}
        finite = all(np.all(np.isfinite(x)) for d in g.values() for x in d.values())
        self._restore()
        if not finite:
            return True
        # gradient norms of the raw gradient, per group
        for gname, members in self.groups().items():
            sq = 0.0
            for n in members:
                if self.weight:
                    s = self.scale[n]
                    A, B = self.p[n]["a"], self.p[n]["b"]
                    G = s * (g[n]["b"] @ A + B @ g[n]["a"])
                    sq += float(np.sum(G * G))
                else:
                    sq += float(np.sum(g[n]["a"] ** 2)) + float(np.sum(g[n]["b"] ** 2))
            gn = math.sqrt(sq)
            if self.gbar[gname] is None:
                self.gbar[gname] = gn
            else:
                self.gbar[gname] = cfg["beta"] * self.gbar[gname] + (1.0 - cfg["beta"]) * gn
        # clipping (torch.nn.utils.clip_grad_norm_)
        if cfg["max_grad_norm"] is not None:
            total = math.sqrt(sum(float(np.sum(x * x)) for d in g.values() for x in d.values()))
            coef = min(1.0, cfg["max_grad_norm"] / (total + 1e-6))
            if coef < 1.0:
                self.clip_bound = True
            g = {n: {k: x * coef for k, x in d.items()} for n, d in g.items()}
        # AdamW
        self.t += 1
        for n in self.names:
            for k in ("a", "b"):
                adamw_update(self.p[n][k], g[n][k], self.m[n][k], self.v[n][k], self.t,
                             lr, aw["beta1"], aw["beta2"], aw["eps"], aw["weight_decay"])
        return False


# ----------------------------------------------------------------------------
# JSON helpers
# ----------------------------------------------------------------------------

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
    return {"shape": [int(s) for s in arr.shape], "data": [num_out(x) for x in arr.reshape(-1)]}


def tensor_in(t):
    return np.array([num_in(x) for x in t["data"]], dtype=np.float64).reshape(t["shape"])


def run_vector(cfg, adapters, steps):
    """adapters: list of {name, alpha, rank, a, b, w0?} with numpy arrays;
    steps: list of {lr, grads: {name: {a, b}}}. Returns (expects, optimizer)."""
    opt = Mgpo(cfg, adapters)
    expects = []
    for st in steps:
        pert = opt.perturb()
        skipped = opt.step(st["grads"], st["lr"])
        e = {"skipped": skipped,
             "perturbation": {n: {k: tensor_out(x) for k, x in pert[n].items()} for n in opt.names},
             "params": {n: {k: tensor_out(opt.p[n][k]) for k in ("a", "b")} for n in opt.names}}
        if opt.weight:
            e["w0"] = {n: tensor_out(opt.w0[n]) for n in opt.names}
        e["grad_norm_ema"] = {g: (None if v is None else float(v)) for g, v in opt.gbar.items()}
        expects.append(e)
    return expects, opt


def vector_json(name, description, cfg, adapters, steps, expects):
    adapters_j = []
    for a in adapters:
        aj = {"name": a["name"], "alpha": float(a["alpha"]), "rank": int(a["rank"]),
              "a": tensor_out(a["a"]), "b": tensor_out(a["b"])}
        if cfg["space"] == "weight":
            aj["w0"] = tensor_out(a["w0"])
        adapters_j.append(aj)
    steps_j = []
    for st, e in zip(steps, expects):
        steps_j.append({"lr": float(st["lr"]),
                        "grads": {n: {k: tensor_out(st["grads"][n][k]) for k in ("a", "b")}
                                  for n in [a["name"] for a in adapters]},
                        "expect": e})
    return {"name": name, "description": description, "config": cfg,
            "adapters": adapters_j, "steps": steps_j,
            "tolerance": {"rtol": 1e-4, "atol": 1e-6}}


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
    steps = []
    for s in d["steps"]:
        steps.append({"lr": s.get("lr", d["config"]["adamw"]["lr"]),
                      "grads": {n: {k: tensor_in(t) for k, t in gd.items()} for n, gd in s["grads"].items()}})
    return d, adapters, steps


# ----------------------------------------------------------------------------
# --check-shared
# ----------------------------------------------------------------------------

class Mismatch(AssertionError):
    pass


def compare(got, want, path, tol, stats):
    """Recursive comparison of two JSON-like values; numbers within tol."""
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            raise Mismatch(f"{path}: keys {sorted(got) if isinstance(got, dict) else got} != {sorted(want)}")
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
        if ".shape[" in path:
            if type(got) is not int or got != want:
                raise Mismatch(f"{path}: {got!r} != {want!r}")
            return
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
        d, adapters, steps = load_vector(os.path.join(directory, f))
        expects, _ = run_vector(d["config"], adapters, steps)
        stats = {"n": 0, "max_abs": 0.0}
        try:
            for i, (got, s) in enumerate(zip(expects, d["steps"])):
                compare(got, s["expect"], f"steps[{i}].expect", tol, stats)
            if len(expects) != len(d["steps"]):
                raise Mismatch("step count")
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
            # reference
            if clip is not None:
                total = math.sqrt(sum(float(np.sum(g * g)) for g in gs))
                coef = min(1.0, clip / (total + 1e-6))
                gs_ref = [g * coef for g in gs]
            else:
                gs_ref = gs
            for p, g, m, v in zip(ps, gs_ref, ms, vs):
                adamw_update(p, g, m, v, t, lr, betas[0], betas[1], 1e-8, wd)
            # torch
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

    # 2. rho = 0 MGPO == torch AdamW (adapter and weight space, both scopes)
    combos = [("adapter", "global", "ascent", None), ("adapter", "per_adapter", "descent", 1.0),
              ("weight", "per_adapter", "descent", None), ("weight", "global", "ascent", 0.5)]
    for ci, (space, scope, direction, clip) in enumerate(combos):
        rng = np.random.default_rng(2000 + ci)
        adapters = random_adapters(rng, [("q", 4, 8.0, 6, 5), ("v", 2, 4.0, 3, 4), ("o", 1, 2.0, 5, 2)],
                                   weight=True)
        cfg = make_config(rho=0.0, direction=direction, space=space, scope=scope,
                          max_inv_scale=10.0, max_grad_norm=clip,
                          adamw={"weight_decay": 0.05, "beta1": 0.85})
        mg = Mgpo(cfg, adapters)
        order = [(a["name"], k) for a in adapters for k in ("a", "b")]
        tps = {nk: torch.nn.Parameter(torch.tensor(adapters[i // 2][nk[1]].copy()))
               for i, nk in enumerate(order)}
        opt = torch.optim.AdamW([tps[nk] for nk in order], lr=1e-3, betas=(0.85, 0.999), eps=1e-8,
                                weight_decay=0.05, amsgrad=False, foreach=False)
        w0_init = {a["name"]: a["w0"].copy() for a in adapters}
        maxdiff = 0.0
        ok = True
        for t in range(20):
            lr = float(rng.uniform(1e-4, 2e-2))
            grads = {a["name"]: {"a": rng.normal(size=a["a"].shape), "b": rng.normal(size=a["b"].shape)}
                     for a in adapters}
            pert = mg.perturb()
            ok = ok and all(np.all(x == 0) for d in pert.values() for x in d.values())
            assert not mg.step(grads, lr)
            for nk in order:
                tps[nk].grad = torch.tensor(grads[nk[0]][nk[1]].copy())
            if clip is not None:
                torch.nn.utils.clip_grad_norm_([tps[nk] for nk in order], clip, foreach=False)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            for nk in order:
                p = mg.p[nk[0]][nk[1]]
                tv = tps[nk].detach().numpy()
                maxdiff = max(maxdiff, float(np.max(np.abs(p - tv))))
                ok = ok and close(p, tv)
            if space == "weight":
                ok = ok and all(np.array_equal(mg.w0[n], w0_init[n]) for n in w0_init)
        report(f"rho=0 MGPO {space}/{scope}/{direction} clip {clip} == torch AdamW (20 steps, wd 0.05)",
               ok, maxdiff)

    print(f"check-torch: {'FAILED' if failures else 'all passed'} (tol {tol:g} abs + rel)")
    return 1 if failures else 0


# ----------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------

def random_adapters(rng, specs, weight):
    """specs: list of (name, rank, alpha, in, out)."""
    out = []
    for name, r, alpha, din, dout in specs:
        a = {"name": name, "alpha": float(alpha), "rank": int(r),
             "a": rng.normal(size=(r, din)) * 0.4,
             "b": rng.normal(size=(dout, r)) * 0.1}
        w0 = rng.normal(size=(dout, din)) * 0.5
        if weight:
            a["w0"] = w0
        out.append(a)
    return out


def random_grads(rng, adapters, n_steps, scale=1.0):
    return [{a["name"]: {"a": rng.normal(size=a["a"].shape) * scale,
                         "b": rng.normal(size=a["b"].shape) * scale} for a in adapters}
            for _ in range(n_steps)]


def cosine_schedule(lr, T, warmup_frac=0.03):
    w = max(1, math.ceil(warmup_frac * T))
    out = []
    for k in range(T):
        if k < w:
            out.append(lr * k / w)
        else:
            out.append(lr * 0.5 * (1.0 + math.cos(math.pi * (k - w) / (T - w))))
    return out, w


TWO = [("q", 4, 8.0, 6, 5), ("v", 2, 4.0, 3, 4)]
TWO_B = [("q_proj", 3, 12.0, 5, 4), ("v_proj", 2, 16.0, 4, 3)]
ONE = [("q", 3, 6.0, 4, 5)]
FOUR = [("q", 1, 2.0, 5, 3), ("k", 2, 16.0, 4, 4), ("v", 3, 3.0, 2, 6), ("o", 4, 32.0, 6, 2)]
TRAINER = dict(space="weight", scope="per_adapter", direction="descent", max_inv_scale=10.0,
               max_grad_norm=1.0)
NLG = dict(rho=0.01, beta=0.8, adamw={"beta1": 0.8})


def case(name, seed, description, specs, cfg, n_steps=6, lr=None, grad_scale=1.0, edit=None, check=None):
    return dict(name=name, seed=seed, description=description, specs=specs, cfg=cfg,
                n_steps=n_steps, lr=lr, grad_scale=grad_scale, edit=edit, check=check)


def _set(grads, step, name, key, index, value):
    grads[step][name][key].reshape(-1)[index] = value


def edit_zero_first(grads):
    for st in grads[:2]:
        for d in st.values():
            for k in d:
                d[k][...] = 0.0


def edit_nan_first(grads):
    _set(grads, 0, "q", "b", 2, math.nan)


def edit_inf_later(grads):
    _set(grads, 2, "v", "a", 1, math.inf)
    _set(grads, 2, "v", "b", 3, -math.inf)


def check_perturbed_from(first_perturbed_step):
    def chk(opt, expects, steps, trace):
        for i, groups in enumerate(trace):
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
    assert not trace[0] and not trace[1], "no perturbation may exist at steps 1-2"
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


INITIAL = [None]  # initial params of the case being generated (for check_rho_zero)

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
]


def build_case(c):
    rng = np.random.default_rng(c["seed"])
    cfg = json.loads(json.dumps(c["cfg"]))  # deep copy
    weight = cfg["space"] == "weight"
    adapters = random_adapters(rng, c["specs"], weight)
    grads = random_grads(rng, adapters, c["n_steps"], c["grad_scale"])
    if c["edit"]:
        c["edit"](grads)
    if c["lr"] == "schedule":
        lrs, _ = cosine_schedule(cfg["adamw"]["lr"], c["n_steps"])
    else:
        lrs = [cfg["adamw"]["lr"]] * c["n_steps"]
    steps = [{"lr": lr, "grads": g} for lr, g in zip(lrs, grads)]
    INITIAL[0] = {a["name"]: {"a": a["a"].copy(), "b": a["b"].copy()} for a in adapters}

    # run with a trace of which groups were perturbed at each step
    opt = Mgpo(cfg, adapters)
    expects, trace = [], []
    for st in steps:
        pert = opt.perturb()
        trace.append(list(opt.perturbed_groups))
        skipped = opt.step(st["grads"], st["lr"])
        e = {"skipped": skipped,
             "perturbation": {n: {k: tensor_out(x) for k, x in pert[n].items()} for n in opt.names},
             "params": {n: {k: tensor_out(opt.p[n][k]) for k in ("a", "b")} for n in opt.names}}
        if weight:
            e["w0"] = {n: tensor_out(opt.w0[n]) for n in opt.names}
        e["grad_norm_ema"] = {g: (None if v is None else float(v)) for g, v in opt.gbar.items()}
        expects.append(e)
    # same result as the plain run_vector path
    assert expects == run_vector(cfg, adapters, steps)[0]
    # generic invariants
    if weight:
        for e in expects:
            for a in adapters:
                assert np.array_equal(tensor_in(e["w0"][a["name"]]), a["w0"])
    if c["check"]:
        c["check"](opt, expects, steps, trace)
    return vector_json(c["name"], c["description"], cfg, adapters, steps, expects)


def generate(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    built = {}
    for c in CASES:
        v = build_case(c)
        text = dumps(v)
        assert len(text.encode()) < 60_000, f"{c['name']}: {len(text)} bytes"
        # round trip: the file re-runs to itself
        path = os.path.join(out_dir, c["name"] + ".json")
        with open(path, "w") as f:
            f.write(text)
        built[c["name"]] = v
        print(f"wrote {path} ({len(text.encode())} bytes, {len(v['steps'])} steps)")
    # global-single and per-adapter-single must agree
    g, p = built["global-single"], built["per-adapter-single"]
    for sg, sp in zip(g["steps"], p["steps"]):
        eg, ep = sg["expect"], sp["expect"]
        for key in ("perturbation", "params", "w0"):
            compare(eg[key], ep[key], key, 1e-12, {"n": 0, "max_abs": 0.0})
        compare(eg["grad_norm_ema"]["global"], ep["grad_norm_ema"]["q"], "gbar", 1e-12,
                {"n": 0, "max_abs": 0.0})
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(here), "conformance", "vectors"),
                    help="output directory for generated vectors (default: <repo>/conformance/vectors)")
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
