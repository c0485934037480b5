//! The example's fine-tuning loop, run short: the loss goes down in every
//! preset, the merged model computes the same, and W0 is never written.

#[path = "../examples/finetune.rs"]
mod finetune;

use mgpo_core::Config;

#[test]
fn fine_tuning_lowers_the_loss_and_keeps_w0() {
    for preset in ["paper-nlu", "trainer-nlu"] {
        let o = finetune::train(Config::preset(preset, 1e-2).unwrap(), 60, false).unwrap();
        assert!(o.final_loss < 0.5 * o.first_loss, "{preset}: loss {} -> {}", o.first_loss, o.final_loss);
        assert!((o.merged_loss - o.final_loss).abs() <= 1e-5 * o.final_loss.max(1e-3), "{preset}: merged {} vs {}", o.merged_loss, o.final_loss);
        assert!(o.w0_unchanged, "{preset}: W0 was written");
    }
}
