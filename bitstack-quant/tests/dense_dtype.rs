//! Dense parts in 16 bits: stored in the writer's type, held in it by the
//! runner, counted at their real size by the ladder, and close to f32 in
//! what the model computes. f32 checkpoints load as before.

mod common;

use std::path::Path;

use bitstack_quant::format::block::names;
use bitstack_quant::format::store::TensorStore;
use bitstack_quant::format::synthetic::SyntheticSpec;
use bitstack_quant::runtime::elastic::BitStackHandle;
use bitstack_quant::{Checkpoint, DenseDtype, Llama};
use candle_core::{DType, Device, Tensor};

/// Biases on q, k, v and an untied head, so every kind of dense part is there.
fn qwen2(dense_dtype: DenseDtype) -> SyntheticSpec {
    SyntheticSpec {
        model_type: "qwen2",
        hidden: 36,
        intermediate: 75,
        heads: 3,
        kv_heads: 1,
        tied: false,
        dense_dtype,
        ..Default::default()
    }
}

fn llama(dense_dtype: DenseDtype) -> SyntheticSpec {
    SyntheticSpec {
        dense_dtype,
        ..Default::default()
    }
}

fn write(spec: &SyntheticSpec, root: &Path, name: &str) -> std::path::PathBuf {
    let dir = root.join(name);
    spec.write_bitstack(&dir, 3, 4).unwrap();
    dir
}

fn is_block(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or("");
    ["qweight_", "u_", "vt_"]
        .iter()
        .any(|p| last.starts_with(p))
}

/// Bytes of every tensor in the files that is not part of a block, read
/// from the safetensors headers.
fn stored_dense_bytes(dir: &Path) -> usize {
    let store = TensorStore::open_dir(dir).unwrap();
    store
        .names()
        .filter(|n| !is_block(n))
        .map(|n| {
            let shape = store.shape(n).unwrap().to_vec();
            store.dense_shaped(n, &shape).unwrap().1.len()
        })
        .sum()
}

fn logits(model: &Llama, vocab: usize) -> Vec<f32> {
    let ids: Vec<u32> = (0..13u32).map(|i| (i * 41 + 3) % vocab as u32).collect();
    let tokens = Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).unwrap();
    common::logits(model, &tokens)
}

#[test]
fn the_ladder_counts_the_dense_parts_at_their_stored_size() {
    let root = tempfile::tempdir().unwrap();
    for spec in [qwen2(DenseDtype::F16), llama(DenseDtype::Bf16)] {
        let dir = write(
            &spec,
            root.path(),
            &format!("{}-{}", spec.model_type, spec.dense_dtype),
        );
        let checkpoint = Checkpoint::open(&dir).unwrap();
        assert_eq!(checkpoint.dense_dtype(), spec.dense_dtype);
        let stored = stored_dense_bytes(&dir);
        assert_eq!(checkpoint.geometry().dense_bytes, stored);
        let params = checkpoint.geometry().parameters - checkpoint.geometry().linear_weights;
        assert_eq!(stored, 2 * params, "every dense tensor in 16 bits");

        let ladder = checkpoint.ladder();
        assert_eq!(
            ladder[0].total_bytes,
            stored + checkpoint.geometry().floor_linear_bytes()
        );
        // What the runner really holds at the floor and at the top.
        for level in [0, ladder.len() - 1] {
            let plan = checkpoint.plan_level(level).unwrap();
            let model = Llama::from_checkpoint(&checkpoint, &plan.counts, &Device::Cpu).unwrap();
            assert_eq!(model.embed.dtype(), spec.dense_dtype.candle());
            assert_eq!(
                model.resident_bytes(),
                ladder[level].total_bytes,
                "level {level}"
            );
        }
        let handle = BitStackHandle::open(&dir, None, &Device::Cpu).unwrap();
        assert_eq!(handle.floor_bytes(), ladder[0].total_bytes as u64);
        handle.set_level(0).unwrap();
        assert_eq!(
            handle.snapshot().resident_bytes() as u64,
            handle.resident_bytes()
        );
    }
}

#[test]
fn sixteen_bit_dense_parts_give_the_logits_of_f32_ones() {
    let root = tempfile::tempdir().unwrap();
    for make in [qwen2, llama] {
        let reference = make(DenseDtype::F32);
        let f32_dir = write(
            &reference,
            root.path(),
            &format!("{}-f32", reference.model_type),
        );
        let f32_model = Llama::from_checkpoint(
            &Checkpoint::open(&f32_dir).unwrap(),
            &Default::default(),
            &Device::Cpu,
        )
        .unwrap();
        let want = logits(&f32_model, reference.vocab);
        // f16 keeps 11 significant bits, bf16 8: the logits move by about that.
        for (dtype, bound) in [(DenseDtype::F16, 2e-3), (DenseDtype::Bf16, 1.5e-2)] {
            let spec = make(dtype);
            let dir = write(&spec, root.path(), &format!("{}-{dtype}", spec.model_type));
            let model = Llama::from_checkpoint(
                &Checkpoint::open(&dir).unwrap(),
                &Default::default(),
                &Device::Cpu,
            )
            .unwrap();
            assert_eq!(model.embed.dtype(), dtype.candle());
            assert_eq!(model.norm.dtype(), dtype.candle());
            if let Some(head) = &model.lm_head {
                assert_eq!(head.dtype(), dtype.candle());
            }
            let got = logits(&model, spec.vocab);
            assert!(got.iter().all(|x| x.is_finite()));
            let e = common::relative_error(&got, &want);
            assert!(
                e > 0.0 && e < bound,
                "{} {dtype}: relative error {e}",
                spec.model_type
            );
        }
    }
}

#[test]
fn a_sixteen_bit_head_gives_the_f32_product_of_its_values() {
    // The head widened in chunks inside the product equals the product with
    // the head widened whole: chunking changes nothing but the memory.
    let root = tempfile::tempdir().unwrap();
    let spec = SyntheticSpec {
        vocab: 1300, // several chunks, the last one short
        ..qwen2(DenseDtype::F16)
    };
    let dir = write(&spec, root.path(), "wide");
    let checkpoint = Checkpoint::open(&dir).unwrap();
    let model = Llama::from_checkpoint(&checkpoint, &Default::default(), &Device::Cpu).unwrap();
    let hidden = Tensor::randn(0f32, 1.0, (5, spec.hidden), &Device::Cpu).unwrap();
    let got: Vec<f32> = model
        .logits(&hidden)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let head = model
        .lm_head
        .as_ref()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let want: Vec<f32> = hidden
        .matmul(&head.t().unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(got.len(), 5 * spec.vocab);
    assert!(common::relative_error(&got, &want) < 1e-6);
}

#[test]
fn an_f32_checkpoint_loads_as_before() {
    let root = tempfile::tempdir().unwrap();
    let spec = qwen2(DenseDtype::F32);
    let dir = write(&spec, root.path(), "f32");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "float32");
    let checkpoint = Checkpoint::open(&dir).unwrap();
    assert_eq!(checkpoint.dense_dtype(), DenseDtype::F32);
    let geometry = checkpoint.geometry();
    // The f32 count of before: four bytes per dense parameter.
    assert_eq!(
        geometry.dense_bytes,
        4 * (geometry.parameters - geometry.linear_weights)
    );
    let model = Llama::from_checkpoint(&checkpoint, &Default::default(), &Device::Cpu).unwrap();
    for t in [&model.embed, &model.norm, model.lm_head.as_ref().unwrap()] {
        assert_eq!(t.dtype(), DType::F32);
    }
    let bias = model.layers[0].q.bias.as_ref().unwrap();
    assert_eq!(bias.dtype(), DType::F32);
    // Exactly the values stored: nothing was rounded on the way in.
    let store = checkpoint.store();
    let name = "lm_head.weight";
    let stored = store.f32(name).unwrap().0;
    let held: Vec<f32> = model
        .lm_head
        .as_ref()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(held, stored);
    // And a block reads as it always did.
    assert!(store.contains(&names::qweight("model.layers.0.self_attn.q_proj", 2)));
}
