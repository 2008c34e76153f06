//! mistral.rs with BitStack layers on a GPU (`--features cuda`, run on a
//! machine with one): the logits mistral.rs computes on CUDA in bf16 equal
//! our runner's on CUDA at three levels, to 1e-2 of the logit scale. The
//! checkpoint is named by BITSTACK_CUDA_CHECKPOINT (the GPU machines have
//! no network to fetch the assets); scripts/device-scenario.sh makes one.
#![cfg(feature = "cuda")]

use std::path::PathBuf;

use bitstack_mistralrs::register;
use bitstack_quant::{BitStackHandle, Budget};
use candle_core::{DType, Device};
use mistralrs::{ModelDType, TextModelBuilder};

mod common;

fn checkpoint() -> PathBuf {
    PathBuf::from(std::env::var("BITSTACK_CUDA_CHECKPOINT").expect(
        "set BITSTACK_CUDA_CHECKPOINT to a BitStack checkpoint (scripts/device-scenario.sh makes one)",
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn logits_on_cuda_equal_our_runner_at_three_levels() {
    let dir = checkpoint();
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    let reference = BitStackHandle::open(&dir, None, &gpu).unwrap();
    let max = reference.max_level();
    for level in [0, max / 2, max] {
        let bytes = reference.bytes_at_level(level);
        let reg = register(
            &dir,
            Some(Budget::Bytes(bytes)),
            None,
            &gpu,
            Some(DType::BF16),
        )
        .unwrap();
        assert_eq!(reg.handle.level(), level);
        let model = TextModelBuilder::new(dir.to_str().unwrap())
            .with_device(gpu.clone())
            .with_dtype(ModelDType::BF16)
            .build()
            .await
            .unwrap();
        let (theirs, tokens) = common::raw_logits(&model, "What is the capital of France?").await;
        reference.set_level(level).unwrap();
        let ours = common::our_logits(&reference, &tokens);
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        let vocab = config["vocab_size"].as_u64().unwrap() as usize;
        assert!(theirs.len() >= vocab && ours.len() >= vocab);
        // Both end with the logits of the last prompt position.
        let (worst, scale) =
            common::gap(&theirs[theirs.len() - vocab..], &ours[ours.len() - vocab..]);
        println!(
            "level {level}/{max}: {} prompt tokens, max |Δ logit| {worst:.2e} of {scale:.2} on {:?}",
            tokens.len(),
            gpu
        );
        assert!(
            worst <= 1e-2 * scale,
            "level {level}: logits differ by {worst} (scale {scale})"
        );
        drop(model);
    }
}
