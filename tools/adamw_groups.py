#!/usr/bin/env python3
"""PyTorch's side of the parameter-group tests (crates/mgpo-ndarray/tests/param_groups.rs).

torch.optim.AdamW (foreach=False) in float64 with one param group per
parameter group, the learning rate scheduled by LambdaLR with transformers'
get_cosine_schedule_with_warmup factor, and, when rho > 0, LoRA-MGPO in
adapter space written here from SPEC's equations around it:

    before the forward pass, per perturbation group (global: every tensor;
    per_adapter: A and B of each adapter, each plain tensor alone), once
    AdamW has state: n = ||m||, k = 1 / (g_bar + eps) (1 without APN or
    before the first g_bar), k = min(k, max_inv_scale), theta += sigma rho k m / (n + eps)
    after the backward pass: g_bar <- ||g|| (first) or beta g_bar + (1 - beta) ||g||
    from the raw gradients, theta -= the same move, clip_grad_norm_, AdamW.

The model: per adapter 0.5 ||(W0 + s B A) X - Y||^2, per plain tensor
p: sum(w * cos(p)) + 0.5 * sum(p^2); gradients by autograd.

stdin, JSON: {"runs": [{
  "name": str, "config": the optimizer's Config (the conformance-vector form),
  "warmup": int, "total": int (steps),
  "groups": [{"lr_scale": float, "weight_decay": float | null}],   # 0 is the default group
  "tensors": [{"name": str, "shape": [int], "data": [float], "group": int}],
  "adapters": [{"a": int, "b": int, "scale": float, "w0": [float], "x": [float], "y": [float]}],
  "plain": [{"index": int, "w": [float]}]}]}
  (w0 is out x in, x is in x n, y is out x n, all row-major)
stdout, JSON: {"runs": [{"name": str, "params": [per step: [per tensor: flat values]]}]}
"""

import json
import math
import sys

import torch


def factor(k, warmup, total):
    """transformers' get_cosine_schedule_with_warmup, as a LambdaLR factor."""
    if k < warmup:
        return k / max(1, warmup)
    progress = (k - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def run(spec):
    cfg = spec["config"]
    if cfg["space"] != "adapter" or "perturbation" in cfg:
        raise SystemExit("adamw_groups.py: only the momentum perturbation in adapter space is written here")
    f64 = torch.float64
    ts = [torch.tensor(t["data"], dtype=f64).reshape(t["shape"]).requires_grad_() for t in spec["tensors"]]
    adamw = cfg["adamw"]
    groups = []
    for gi, g in enumerate(spec["groups"]):
        params = [p for p, t in zip(ts, spec["tensors"]) if t["group"] == gi]
        if params:
            wd = adamw["weight_decay"] if g["weight_decay"] is None else g["weight_decay"]
            groups.append({"params": params, "lr": adamw["lr"] * g["lr_scale"], "weight_decay": wd})
    opt = torch.optim.AdamW(groups, lr=adamw["lr"], betas=(adamw["beta1"], adamw["beta2"]), eps=adamw["eps"],
                            weight_decay=adamw["weight_decay"], foreach=False)
    warmup, total = spec["warmup"], spec["total"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: factor(k, warmup, total))

    adapters = []
    for ad in spec["adapters"]:
        (out, r), inp = ts[ad["b"]].shape, ts[ad["a"]].shape[1]
        w0 = torch.tensor(ad["w0"], dtype=f64).reshape(out, inp)
        x = torch.tensor(ad["x"], dtype=f64).reshape(inp, -1)
        y = torch.tensor(ad["y"], dtype=f64).reshape(out, -1)
        adapters.append((ts[ad["a"]], ts[ad["b"]], ad["scale"], w0, x, y))
    plain = [(ts[p["index"]], torch.tensor(p["w"], dtype=f64).reshape(ts[p["index"]].shape)) for p in spec["plain"]]

    def loss():
        total_loss = torch.zeros((), dtype=f64)
        for a, b, s, w0, x, y in adapters:
            r = (w0 + s * (b @ a)) @ x - y
            total_loss = total_loss + 0.5 * (r * r).sum()
        for p, w in plain:
            total_loss = total_loss + (w * torch.cos(p)).sum() + 0.5 * (p * p).sum()
        return total_loss

    rho = cfg["rho"]
    if cfg["scope"] == "global":
        pgroups = [list(range(len(ts)))]
    else:
        pgroups = [[ad["a"], ad["b"]] for ad in spec["adapters"]] + [[p["index"]] for p in spec["plain"]]
    sigma = 1.0 if cfg["direction"] == "ascent" else -1.0
    g_bar = [None] * len(pgroups)
    history = []
    for _ in range(total):
        moves = []
        with torch.no_grad():
            if rho > 0 and all(len(opt.state[p]) > 0 for p in ts):
                for gi, members in enumerate(pgroups):
                    ms = [opt.state[ts[i]]["exp_avg"] for i in members]
                    n = math.sqrt(sum(float((m * m).sum()) for m in ms))
                    k = 1.0 / (g_bar[gi] + cfg["eps"]) if cfg["adaptive_norm"] and g_bar[gi] is not None else 1.0
                    if cfg["max_inv_scale"] is not None:
                        k = min(k, cfg["max_inv_scale"])
                    if n <= cfg["eps"]:
                        continue
                    c = sigma * rho * k / (n + cfg["eps"])
                    for i, m in zip(members, ms):
                        ts[i].add_(m, alpha=c)
                        moves.append((ts[i], m.clone(), c))
        opt.zero_grad(set_to_none=True)
        loss().backward()
        with torch.no_grad():
            if not all(bool(torch.isfinite(p.grad).all()) for p in ts):
                raise SystemExit("adamw_groups.py: non-finite gradient (the test's problem should never give one)")
            if rho > 0:
                for gi, members in enumerate(pgroups):
                    norm = math.sqrt(sum(float((ts[i].grad * ts[i].grad).sum()) for i in members))
                    g_bar[gi] = norm if g_bar[gi] is None else cfg["beta"] * g_bar[gi] + (1.0 - cfg["beta"]) * norm
            for p, m, c in moves:
                p.add_(m, alpha=-c)
        if cfg["max_grad_norm"] is not None:
            torch.nn.utils.clip_grad_norm_(ts, cfg["max_grad_norm"], foreach=False)
        opt.step()
        sched.step()
        history.append([p.detach().reshape(-1).tolist() for p in ts])
    return {"name": spec["name"], "params": history}


def main():
    torch.set_num_threads(1)
    spec = json.load(sys.stdin)
    json.dump({"runs": [run(r) for r in spec["runs"]]}, sys.stdout)


if __name__ == "__main__":
    main()
