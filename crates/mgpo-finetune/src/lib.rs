//! # mgpo-finetune
//!
//! LoRA-MGPO fine-tuning of a pretrained BERT-family model (default
//! all-MiniLM-L6-v2) for text classification, with
//! `candle_transformers::models::bert` used as it is, and adapters that
//! Python's peft loads (and that peft writes, loaded here).
//!
//! - [`data`]: the WordNet noun-supersense task and CSV / JSONL files.
//! - [`model`]: the model with LoRA through its `VarBuilder` ([`LoraBert`]).
//! - [`peft`]: the adapter files.
#![warn(missing_docs)]

pub mod data;
pub mod error;
pub mod model;
pub mod peft;
mod rng;
pub mod train;

pub use error::{FinetuneError, Result};
pub use model::{LoraBert, ModelFiles, TextEncoder};
pub use rng::SplitMix64;
