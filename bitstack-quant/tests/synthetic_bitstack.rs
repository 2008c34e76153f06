//! Random BitStack checkpoints written directly open, resize and run like
//! compressed ones: the resize benchmarks rely on them.

use bitstack_quant::format::synthetic::SyntheticSpec;
use bitstack_quant::runtime::elastic::BitStackHandle;
use bitstack_quant::Checkpoint;
use candle_core::{Device, Tensor};

fn finite_logits(handle: &BitStackHandle, vocab: usize) -> Vec<f32> {
    let ids: Vec<u32> = (0..11u32).map(|i| (i * 37 + 5) % vocab as u32).collect();
    let tokens = Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).unwrap();
    let logits: Vec<f32> = handle
        .snapshot()
        .forward(&tokens)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(logits.len(), ids.len() * vocab);
    assert!(logits.iter().all(|x| x.is_finite()));
    logits
}

#[test]
fn a_random_bitstack_checkpoint_opens_resizes_and_runs() {
    for spec in [
        SyntheticSpec::default(),
        // Biases on q, k, v and an untied head; m·n not a multiple of 8.
        SyntheticSpec {
            model_type: "qwen2",
            hidden: 36,
            intermediate: 75,
            heads: 3,
            kv_heads: 1,
            tied: false,
            ..Default::default()
        },
    ] {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("packed");
        let (blocks, k) = (3, 4);
        spec.write_bitstack(&dir, blocks, k).unwrap();

        let handle = BitStackHandle::open(&dir, None, &Device::Cpu).unwrap();
        let linears = 7 * spec.layers;
        assert_eq!(handle.max_level(), (blocks - 1) * linears);
        assert_eq!(handle.level(), handle.max_level());
        let top = finite_logits(&handle, spec.vocab);

        // Down one level and back: the grown blocks pass their checksums,
        // and the model is the one it was.
        let top_level = handle.max_level();
        handle.set_level(top_level - linears).unwrap();
        let lower = finite_logits(&handle, spec.vocab);
        assert_ne!(lower, top);
        handle.set_level(top_level).unwrap();
        assert_eq!(finite_logits(&handle, spec.vocab), top);

        // Every stored block reads back with its checksum, padding included.
        let checkpoint = handle.checkpoint();
        for slot in &checkpoint.geometry().linears {
            for b in 0..blocks {
                checkpoint.read_block(slot, b).unwrap();
            }
        }
    }
}

#[test]
fn writing_is_deterministic_and_refuses_a_full_dir() {
    let root = tempfile::tempdir().unwrap();
    let spec = SyntheticSpec::default();
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    spec.write_bitstack(&a, 2, 2).unwrap();
    spec.write_bitstack(&b, 2, 2).unwrap();
    let (ca, cb) = (Checkpoint::open(&a).unwrap(), Checkpoint::open(&b).unwrap());
    for name in [
        "model.layers.1.mlp.down_proj.vt_1",
        "model.embed_tokens.weight",
    ] {
        assert_eq!(
            ca.store().f32(name).unwrap(),
            cb.store().f32(name).unwrap(),
            "{name}"
        );
    }
    let down = &ca.geometry().linears[7 + 6];
    assert_eq!(
        (down.name.as_str(), down.m, down.n, down.k),
        ("model.layers.1.mlp.down_proj", 48, 104, 2)
    );
    assert_eq!(
        ca.read_block(down, 1).unwrap(),
        cb.read_block(down, 1).unwrap()
    );
    assert!(spec.write_bitstack(&a, 2, 2).is_err());
}

#[test]
fn a_linears_only_model_holds_no_dense_parts_and_refuses_to_run() {
    use bitstack_quant::runtime::linear::LinearWeight;
    use bitstack_quant::runtime::placement::Placement;

    let spec = SyntheticSpec::default();
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("packed");
    spec.write_bitstack(&dir, 3, 4).unwrap();
    let open = |placement: Placement| {
        let checkpoint = Checkpoint::open(&dir).unwrap();
        let plan = checkpoint.plan_all();
        BitStackHandle::from_checkpoint_placed(checkpoint, &plan, &Device::Cpu, placement).unwrap()
    };
    let whole = open(Placement::of(&Device::Cpu));
    let linears = open(Placement::of(&Device::Cpu).linears_only());
    let (w, l) = (whole.snapshot(), linears.snapshot());
    // Only the blocks are held (this spec has no biases)…
    assert_eq!(l.resident_bytes(), l.stack_bytes());
    assert_eq!(l.stack_bytes(), w.stack_bytes());
    assert!(w.resident_bytes() > w.stack_bytes());
    // …the same blocks…
    for ((_, _, a), (_, _, b)) in w.linears().zip(l.linears()) {
        let (LinearWeight::BitStack(a), LinearWeight::BitStack(b)) = (&a.weight, &b.weight) else {
            panic!("dense linear")
        };
        assert_eq!(a.dense().unwrap(), b.dense().unwrap());
    }
    // …the budget still counts the dense parts (the engine's copies)…
    assert_eq!(linears.resident_bytes(), whole.resident_bytes());
    // …and the model cannot run on its own.
    let tokens = Tensor::from_slice(&[1u32, 2, 3], (1, 3), &Device::Cpu).unwrap();
    let e = l.forward(&tokens).unwrap_err().to_string();
    assert!(e.contains("holds its linears only"), "{e}");
    finite_logits(&whole, spec.vocab);
}
