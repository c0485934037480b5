#!/usr/bin/env python3
"""Python side of mgpo-finetune's agreement tests (crates/mgpo-finetune/tests/python.rs).

Subcommands, each reading a JSON request file and writing a JSON answer:

  hidden   transformers AutoModel's last_hidden_state (and the token ids and
           mask of AutoTokenizer) for fixed texts: the Rust model must match.
  logits   AutoModelForSequenceClassification + peft.PeftModel.from_pretrained
           on an adapter directory written by Rust: logits unmerged and after
           merge_and_unload, for the Rust test to compare with its own.
  train    a peft LoRA adapter created and trained a few AdamW steps in
           PyTorch, saved with save_pretrained, with its logits: Rust loads
           it and must reproduce them.

Everything runs in float32 on the CPU with eager attention and 2 threads.
"""
import json
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

torch.set_num_threads(2)


def tokenize(model_dir, texts, max_len):
    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")


def classifier(model_dir, num_labels):
    m = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels, attn_implementation="eager")
    return m.eval()


def hidden(req):
    enc = tokenize(req["model"], req["texts"], req["max_len"])
    m = AutoModel.from_pretrained(req["model"], attn_implementation="eager").eval()
    with torch.no_grad():
        h = m(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    return {"ids": enc["input_ids"].tolist(), "mask": enc["attention_mask"].tolist(), "hidden": h.tolist()}


def logits(req):
    enc = tokenize(req["model"], req["texts"], req["max_len"])
    base = classifier(req["model"], req["num_labels"])
    pm = PeftModel.from_pretrained(base, req["adapter"]).eval()
    with torch.no_grad():
        unmerged = pm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        merged_model = pm.merge_and_unload().eval()
        merged = merged_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    return {"unmerged": unmerged.tolist(), "merged": merged.tolist()}


def train(req):
    torch.manual_seed(req.get("seed", 0))
    enc = tokenize(req["model"], req["texts"], req["max_len"])
    labels = torch.tensor(req["labels"])
    base = classifier(req["model"], req["num_labels"])
    n_layers = base.config.num_hidden_layers
    cfg = LoraConfig(
        r=req["r"],
        lora_alpha=req["alpha"],
        use_rslora=req.get("rslora", False),
        target_modules=["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
        layers_to_transform=list(range(req["first_layer"], n_layers)),
        layers_pattern="layer",
        lora_dropout=0.0,
        bias="none",
        task_type="SEQ_CLS",
    )
    pm = get_peft_model(base, cfg)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=req.get("lr", 1e-2))
    pm.train()
    for _ in range(req["steps"]):
        out = pm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    pm.eval()
    pm.save_pretrained(req["adapter"])
    with torch.no_grad():
        lg = pm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    return {"logits": lg.tolist()}


def main():
    cmd, req_path, out_path = sys.argv[1:4]
    with open(req_path) as f:
        req = json.load(f)
    out = {"hidden": hidden, "logits": logits, "train": train}[cmd](req)
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
