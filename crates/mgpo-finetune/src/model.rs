//! An unmodified `candle_transformers::models::bert` model with LoRA
//! adapters on its attention and feed-forward linears and a sequence
//! classification head, as `transformers`' `BertForSequenceClassification`
//! under peft.
//!
//! The model's code is not copied or edited: its weights come through a
//! `VarBuilder` in which each targeted weight W (out x in) is a candle
//! `Var`. Before a forward pass, [`LoraBert::sync`] writes
//! W = W0 + s B A into it (s = alpha / r, or alpha / sqrt(r) with rsLoRA),
//! so the model computes peft's y = W0 x + s B (A x) + b. The plan for
//! training is to take the full weight gradient g_W from autograd and
//! project it onto the adapters (dW = s (dB A + B dA)):
//!
//!   g_A = s B^T g_W   (r x in),     g_B = s g_W A^T   (out x r).
//!
//! Found while building it: candle-nn 0.11's `LayerNorm` takes a fused
//! kernel (`ops::layer_norm`, applied with `apply_op3_no_bwd`) whenever its
//! input is contiguous, which in `BertLayer` it always is, so autograd
//! stops at every LayerNorm and the unmodified `BertEncoder` gives no
//! gradient to any weight below its last LayerNorm. So `BertModel` and
//! `BertEncoder` serve as they are for the frozen layers and as the
//! reference, and training runs the adapted layers' equations written out
//! ([`LoraBert::hidden_trainable`]: the same `Var` weights, LayerNorm from
//! differentiable ops), tested equal to `BertEncoder`'s output.
//!
//! When only the top layers are adapted, the frozen bottom (embeddings and
//! layers below the first adapted one) is a separate `BertModel` with that
//! many layers, run once per example ([`LoraBert::encode_frozen`]) and cached;
//! the adapted top is a `BertEncoder` loaded from the same weights renamed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor, Var, D};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertEncoder, BertModel, Config as BertConfig};
use mgpo_core::LoraConfig;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::error::{io, FinetuneError, Result};
use crate::rng::SplitMix64;

/// peft's names of the adapted linears inside a BERT layer, as suffixes of
/// `bert.encoder.layer.<i>.`: query, key, value, the attention output and
/// the two feed-forward linears.
pub const TARGETS: [&str; 6] = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense", "intermediate.dense", "output.dense"];

/// The peft `target_modules` that select exactly [`TARGETS`] (a module
/// matches when its path ends with one; `pooler.dense` does not).
pub const PEFT_TARGET_MODULES: [&str; 6] = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"];

/// A model directory in Hugging Face layout: `config.json`,
/// `model.safetensors`, `tokenizer.json`.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// The directory.
    pub dir: PathBuf,
    /// The parsed `config.json`.
    pub config: BertConfig,
}

impl ModelFiles {
    /// Checks the three files exist and parses the configuration.
    pub fn open(dir: &Path) -> Result<Self> {
        let err = |detail: String| FinetuneError::Model { dir: dir.into(), detail };
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            if !dir.join(f).is_file() {
                return Err(err(format!("no {f} (scripts/fetch-minilm.sh fetches the default model)")));
            }
        }
        let text = std::fs::read_to_string(dir.join("config.json")).map_err(io(dir.join("config.json")))?;
        let config: BertConfig = serde_json::from_str(&text).map_err(|e| err(format!("config.json is not a BERT configuration: {e}")))?;
        if config.num_attention_heads == 0 || config.hidden_size % config.num_attention_heads != 0 {
            return Err(err(format!("hidden_size {} is not a multiple of num_attention_heads {}", config.hidden_size, config.num_attention_heads)));
        }
        Ok(ModelFiles { dir: dir.into(), config })
    }

    /// The tokenizer, truncating and padding every text to `max_len` tokens.
    pub fn tokenizer(&self, max_len: usize) -> Result<TextEncoder> {
        TextEncoder::new(&self.dir.join("tokenizer.json"), max_len)
    }
}

/// A `tokenizers` tokenizer that turns texts into fixed-length id and
/// attention-mask tensors.
pub struct TextEncoder {
    tok: Tokenizer,
    max_len: usize,
}

/// Token ids and attention mask of a batch, both `[n, max_len]` u32.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// Token ids.
    pub ids: Tensor,
    /// 1 for a real token, 0 for padding.
    pub mask: Tensor,
}

impl TextEncoder {
    /// Loads `tokenizer.json`; `max_len` must fit `[CLS] ... [SEP]`.
    pub fn new(path: &Path, max_len: usize) -> Result<Self> {
        if max_len < 2 {
            return Err(FinetuneError::Option { name: "max-len", detail: format!("{max_len}: at least 2 ([CLS] and [SEP])") });
        }
        let mut tok = Tokenizer::from_file(path).map_err(|e| FinetuneError::Tokenizer(format!("{}: {e}", path.display())))?;
        let pad_id = tok.token_to_id("[PAD]").unwrap_or(0);
        tok.with_truncation(Some(TruncationParams { max_length: max_len, ..Default::default() })).map_err(|e| FinetuneError::Tokenizer(e.to_string()))?;
        tok.with_padding(Some(PaddingParams { strategy: PaddingStrategy::Fixed(max_len), pad_id, pad_token: "[PAD]".into(), ..Default::default() }));
        Ok(TextEncoder { tok, max_len })
    }

    /// The fixed sequence length.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Encodes `texts` (with special tokens) on `dev`.
    pub fn encode(&self, texts: &[&str], dev: &Device) -> Result<Encoded> {
        let enc = self.tok.encode_batch(texts.to_vec(), true).map_err(|e| FinetuneError::Tokenizer(e.to_string()))?;
        let (mut ids, mut mask) = (Vec::with_capacity(texts.len() * self.max_len), Vec::with_capacity(texts.len() * self.max_len));
        for e in &enc {
            ids.extend_from_slice(e.get_ids());
            mask.extend_from_slice(e.get_attention_mask());
        }
        let shape = (texts.len(), self.max_len);
        Ok(Encoded { ids: Tensor::from_vec(ids, shape, dev)?, mask: Tensor::from_vec(mask, shape, dev)? })
    }
}

/// One adapted linear: the model's weight W (a `Var` the model reads), the
/// frozen W0, and the adapter A (r x in), B (out x r).
pub struct Target {
    /// peft's module path, `bert.encoder.layer.<i>.<suffix>`.
    pub name: String,
    /// The weight the model multiplies by; [`LoraBert::sync`] writes it.
    pub w: Var,
    /// The pretrained weight (the optimizer perturbs it in `weight` space).
    pub w0: Tensor,
    /// A, r x in.
    pub a: Var,
    /// B, out x r.
    pub b: Var,
    /// s.
    pub scale: f64,
}

/// BERT with LoRA adapters on the layers from `first_adapted` up and a
/// classification head: logits = C tanh(P h_cls + p) + c (h_cls: the
/// last hidden state of the `[CLS]` token), with the
/// pretrained pooler (P, p) frozen and the classifier C, c trainable.
pub struct LoraBert {
    config: BertConfig,
    lora: LoraConfig,
    first_adapted: usize,
    bottom: BertModel,
    top: BertEncoder,
    /// Per adapted layer, the non-target tensors by suffix (biases, LayerNorms), for [`LoraBert::hidden_trainable`].
    top_rest: Vec<HashMap<String, Tensor>>,
    pooler: (Tensor, Tensor),
    /// The adapted linears, layer by layer in [`TARGETS`] order.
    pub targets: Vec<Target>,
    /// Classifier weight (labels x hidden) and bias.
    pub classifier: (Var, Var),
    dev: Device,
}

impl LoraBert {
    /// Loads the model of `files` in f32 on `dev` with fresh adapters
    /// (peft's initialisation: A Kaiming-uniform with bound 1 / sqrt(in),
    /// B = 0) on layers `first_adapted..` and a classifier for `labels`
    /// classes (weight N(0, 0.02^2), bias 0), all drawn from `seed`.
    pub fn load(files: &ModelFiles, lora: LoraConfig, first_adapted: usize, labels: usize, seed: u64, dev: &Device) -> Result<Self> {
        lora.validate()?;
        let cfg = &files.config;
        let err = |detail: String| FinetuneError::Model { dir: files.dir.clone(), detail };
        if first_adapted >= cfg.num_hidden_layers {
            return Err(FinetuneError::Option { name: "adapt-from", detail: format!("layer {first_adapted}, the model has {} layers (0..{})", cfg.num_hidden_layers, cfg.num_hidden_layers) });
        }
        if labels < 2 {
            return Err(FinetuneError::Option { name: "labels", detail: format!("{labels}: a classifier needs two or more") });
        }
        let path = files.dir.join("model.safetensors");
        let raw = candle_core::safetensors::load(&path, dev).map_err(|e| err(format!("model.safetensors: {e}")))?;
        // Checkpoints of BertModel have no prefix, those of the task models `bert.`.
        let mut weights: HashMap<String, Tensor> = HashMap::new();
        for (k, t) in raw {
            let k = k.strip_prefix("bert.").map(str::to_string).unwrap_or(k);
            let t = if t.dtype().is_float() { t.to_dtype(DType::F32)? } else { t };
            weights.insert(k, t);
        }
        let get = |k: &str| weights.get(k).cloned().ok_or_else(|| err(format!("model.safetensors has no `{k}`")));
        let pooler = (get("pooler.dense.weight")?, get("pooler.dense.bias")?);

        let bottom_cfg = BertConfig { num_hidden_layers: first_adapted, ..cfg.clone() };
        let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, dev);
        let bottom = BertModel::load(vb, &bottom_cfg).map_err(|e| err(format!("loading the frozen layers: {e}")))?;

        let mut rng = SplitMix64::new(seed);
        let mut top_weights = HashMap::new();
        let mut top_rest = Vec::new();
        let mut targets = Vec::new();
        for layer in first_adapted..cfg.num_hidden_layers {
            let (from, to) = (format!("encoder.layer.{layer}."), format!("encoder.layer.{}.", layer - first_adapted));
            let mut rest = HashMap::new();
            for (k, t) in weights.iter().filter(|(k, _)| k.starts_with(&from)) {
                top_weights.insert(k.replacen(&from, &to, 1), t.clone());
                rest.insert(k[from.len()..].to_string(), t.clone());
            }
            top_rest.push(rest);
            for suffix in TARGETS {
                let key = format!("{from}{suffix}.weight");
                let w0 = get(&key)?;
                let (out, inp) = w0.dims2()?;
                let w = Var::from_tensor(&w0)?;
                let bound = 1.0 / (inp as f64).sqrt();
                let a: Vec<f32> = (0..lora.rank * inp).map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32).collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (lora.rank, inp), dev)?)?;
                let b = Var::from_tensor(&Tensor::zeros((out, lora.rank), DType::F32, dev)?)?;
                top_weights.insert(key.replacen(&from, &to, 1), w.as_tensor().clone());
                targets.push(Target { name: format!("bert.{from}{suffix}"), w, w0, a, b, scale: lora.scale() });
            }
        }
        let top_cfg = BertConfig { num_hidden_layers: cfg.num_hidden_layers - first_adapted, ..cfg.clone() };
        let top = BertEncoder::load(VarBuilder::from_tensors(top_weights, DType::F32, dev).pp("encoder"), &top_cfg).map_err(|e| err(format!("loading the adapted layers: {e}")))?;

        let c: Vec<f32> = (0..labels * cfg.hidden_size).map(|_| (0.02 * rng.normal()) as f32).collect();
        let classifier = (Var::from_tensor(&Tensor::from_vec(c, (labels, cfg.hidden_size), dev)?)?, Var::zeros(labels, DType::F32, dev)?);
        let model = LoraBert { config: cfg.clone(), lora, first_adapted, bottom, top, top_rest, pooler, targets, classifier, dev: dev.clone() };
        model.sync()?;
        Ok(model)
    }

    /// The BERT configuration.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// The adapters' rank, alpha, rsLoRA.
    pub fn lora(&self) -> &LoraConfig {
        &self.lora
    }

    /// The first adapted layer.
    pub fn first_adapted(&self) -> usize {
        self.first_adapted
    }

    /// Number of classes.
    pub fn num_labels(&self) -> usize {
        self.classifier.1.dims()[0]
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// Writes W = W0 + s B A into every target's weight: after any change
    /// of W0, A or B (a perturbation, a step, loading an adapter).
    pub fn sync(&self) -> Result<()> {
        for t in &self.targets {
            let w = ((t.b.as_tensor().detach().matmul(&t.a.as_tensor().detach())? * t.scale)? + &t.w0)?;
            t.w.set(&w)?;
        }
        Ok(())
    }

    /// The frozen part: embeddings and layers `0..first_adapted`, `[n, L, H]`.
    pub fn encode_frozen(&self, enc: &Encoded) -> Result<Tensor> {
        Ok(self.bottom.forward(&enc.ids, &enc.ids.zeros_like()?, Some(&enc.mask))?.detach())
    }

    /// The last hidden state from the frozen part's output (as
    /// `AutoModel(...).last_hidden_state`).
    pub fn hidden(&self, frozen: &Tensor, mask: &Tensor) -> Result<Tensor> {
        // transformers' extended mask: 0 where attended, the dtype's minimum where padded.
        let m = mask.to_dtype(DType::F32)?.unsqueeze(1)?.unsqueeze(1)?;
        let ext = ((1.0 - m)? * f32::MIN as f64)?;
        Ok(self.top.forward(frozen, &ext)?)
    }

    /// The adapted layers' forward pass written out (BertLayer's equations,
    /// the same weights), with LayerNorm composed of differentiable ops
    /// (`candle_nn::ops::layer_norm_slow`) so that autograd reaches every
    /// target weight; `BertEncoder`'s fused LayerNorm has no backward (see
    /// the module docs). Equal to [`LoraBert::hidden`] up to rounding (tested).
    pub fn hidden_trainable(&self, frozen: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let m = mask.to_dtype(DType::F32)?.unsqueeze(1)?.unsqueeze(1)?;
        let ext = ((1.0 - m)? * f32::MIN as f64)?;
        let (heads, eps) = (self.config.num_attention_heads, self.config.layer_norm_eps as f32);
        let d = self.config.hidden_size / heads;
        let mut h = frozen.clone();
        for (l, rest) in self.top_rest.iter().enumerate() {
            let w = |i: usize| self.targets[l * TARGETS.len() + i].w.as_tensor();
            let r = |k: &str| rest.get(k).ok_or_else(|| FinetuneError::Model { dir: PathBuf::new(), detail: format!("no `{k}` in an adapted layer") });
            let lin = |x: &Tensor, i: usize, bias: &str| -> Result<Tensor> { Ok(x.broadcast_matmul(&w(i).t()?)?.broadcast_add(r(bias)?)?) };
            let (n, len, hid) = h.dims3()?;
            let split = |x: Tensor| -> Result<Tensor> { Ok(x.reshape((n, len, heads, d))?.transpose(1, 2)?.contiguous()?) };
            let q = split(lin(&h, 0, "attention.self.query.bias")?)?;
            let k = split(lin(&h, 1, "attention.self.key.bias")?)?;
            let v = split(lin(&h, 2, "attention.self.value.bias")?)?;
            let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?.broadcast_add(&ext)?;
            let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
            let ctx = probs.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((n, len, hid))?;
            let a = (lin(&ctx, 3, "attention.output.dense.bias")? + &h)?;
            let a = candle_nn::ops::layer_norm_slow(&a, r("attention.output.LayerNorm.weight")?, r("attention.output.LayerNorm.bias")?, eps)?;
            let i = lin(&a, 4, "intermediate.dense.bias")?.gelu_erf()?;
            let o = (lin(&i, 5, "output.dense.bias")? + &a)?;
            h = candle_nn::ops::layer_norm_slow(&o, r("output.LayerNorm.weight")?, r("output.LayerNorm.bias")?, eps)?;
        }
        Ok(h)
    }

    /// Class logits `[n, labels]` from the frozen part's output, through
    /// [`LoraBert::hidden_trainable`] (differentiable).
    pub fn logits(&self, frozen: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let cls = self.hidden_trainable(frozen, mask)?.i((.., 0))?;
        let pooled = cls.matmul(&self.pooler.0.t()?)?.broadcast_add(&self.pooler.1)?.tanh()?;
        Ok(pooled.matmul(&self.classifier.0.as_tensor().t()?)?.broadcast_add(self.classifier.1.as_tensor())?)
    }

    /// Logits of raw texts (tokenised by `enc`), in chunks of `chunk`.
    pub fn predict(&self, enc: &TextEncoder, texts: &[&str], chunk: usize) -> Result<Tensor> {
        let mut out = Vec::new();
        for c in texts.chunks(chunk.max(1)) {
            let e = enc.encode(c, &self.dev)?;
            out.push(self.logits(&self.encode_frozen(&e)?, &e.mask)?.detach());
        }
        Ok(Tensor::cat(&out, 0)?)
    }

    /// The gradients of the trainable tensors from a backward pass: each
    /// adapter's g_A = s B^T g_W and g_B = s g_W A^T from its weight's
    /// gradient, and the classifier's as they are. A missing one stays
    /// missing, for the optimizer to name.
    pub fn project(&self, grads: &candle_core::backprop::GradStore) -> Result<candle_core::backprop::GradStore> {
        let mut out = candle_core::backprop::GradStore::default();
        for t in &self.targets {
            if let Some(gw) = grads.get(t.w.as_tensor()) {
                let (a, b) = (t.a.as_tensor().detach(), t.b.as_tensor().detach());
                out.insert(t.a.as_tensor(), (b.t()?.matmul(gw)? * t.scale)?);
                out.insert(t.b.as_tensor(), (gw.matmul(&a.t()?)? * t.scale)?);
            }
        }
        for v in [&self.classifier.0, &self.classifier.1] {
            if let Some(g) = grads.get(v.as_tensor()) {
                out.insert(v.as_tensor(), g.clone());
            }
        }
        Ok(out)
    }

    /// The trainable tensors by name (peft module paths with `.lora_A`,
    /// `.lora_B`; `classifier.weight`, `classifier.bias`), for the
    /// optimizer and the adapter files.
    pub fn trainable(&self) -> Vec<(String, &Var)> {
        let mut v = Vec::new();
        for t in &self.targets {
            v.push((format!("{}.lora_A", t.name), &t.a));
            v.push((format!("{}.lora_B", t.name), &t.b));
        }
        v.push(("classifier.weight".into(), &self.classifier.0));
        v.push(("classifier.bias".into(), &self.classifier.1));
        v
    }
}

/// Mean cross-entropy of `logits` `[n, k]` against `labels` `[n]` (u32).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::loss::cross_entropy(logits, labels)?)
}

/// The number of rows whose arg-max equals the label.
pub fn correct(logits: &Tensor, labels: &Tensor) -> Result<usize> {
    let pred = logits.argmax(D::Minus1)?;
    Ok(pred.eq(labels)?.to_dtype(DType::U32)?.sum_all()?.to_scalar::<u32>()? as usize)
}
