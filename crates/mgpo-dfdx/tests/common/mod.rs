//! The model the optimizer tests train: a LoRA layer (rank 2, s = 1.5)
//! with a non-zero B, so that the first step already moves A, then a ReLU
//! and a plain linear head. Its layout names are `0.a`, `0.b`, `2.weight`,
//! `2.bias`.

use dfdx::nn::modules::{Linear, ReLU};
use dfdx::nn::BuildModule;
use dfdx::prelude::*;
use mgpo_core::LoraConfig;
use mgpo_dfdx::LoraLinear;

pub const IN: usize = 5;
pub const HID: usize = 4;
pub const OUT: usize = 3;
pub type Net = (LoraLinear<IN, HID, 2, f64, Cpu>, ReLU, Linear<HID, OUT, f64, Cpu>);

pub fn net(dev: &Cpu) -> Net {
    let mut m = Net::build(dev);
    m.0.set_config(LoraConfig::new(2, 3.0)).unwrap(); // s = 1.5
    m.0.lora_b = dev.sample_normal::<Rank2<HID, 2>>() * 0.3;
    m
}
