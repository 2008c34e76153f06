//! Exact and fast sorting agree where the answer is known by construction.
//!
//! A small model is compressed, then every linear but one has its extra
//! blocks zeroed: adding them changes nothing. The scoring text is sampled
//! from the full-stack model, so moving the one live linear closer to its
//! full stack must lower the loss. Every method must put that linear's
//! blocks first.

mod common;

use std::path::Path;

use bitstack_quant::eval::sort::{sort_on_windows, SortMethod};
use bitstack_quant::format::checkpoint::BlockCounts;
use bitstack_quant::format::synthetic::SyntheticSpec;
use bitstack_quant::method::compress::compress;
use bitstack_quant::runtime::model::Llama;
use bitstack_quant::Checkpoint;
use candle_core::{Device, Tensor};
use indicatif::ProgressBar;
use rand::{rngs::StdRng, Rng, SeedableRng};

const LIVE: &str = "model.layers.1.mlp.down_proj";

/// Token windows sampled (temperature 1) from the model in `dir`.
fn sample(dir: &Path, count: usize, len: usize) -> Vec<Vec<u32>> {
    let model = Llama::load(dir, &BlockCounts::all(), &Device::Cpu).unwrap();
    let mut rng = StdRng::seed_from_u64(4);
    (0..count)
        .map(|w| {
            let mut ids = vec![(w * 31 % 256) as u32];
            while ids.len() < len {
                let x = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).unwrap();
                let logits = model
                    .forward(&x)
                    .unwrap()
                    .get(0)
                    .unwrap()
                    .get(ids.len() - 1)
                    .unwrap();
                let p = candle_nn::ops::softmax_last_dim(&logits)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let mut r = rng.random::<f32>();
                let next = p.iter().position(|&q| {
                    r -= q;
                    r <= 0.0
                });
                ids.push(next.unwrap_or(p.len() - 1) as u32);
            }
            ids
        })
        .collect()
}

/// Zeroes `u_b` (b ≥ 1) of every linear but [`LIVE`].
fn zero_dead_blocks(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_none_or(|x| x != "safetensors") {
            continue;
        }
        // Edited on purpose: the blocks' checksums go.
        common::rewrite_safetensors(
            &path,
            |tensors| {
                for (name, _, _, data) in tensors.iter_mut() {
                    let dead =
                        !name.starts_with(LIVE) && name.contains(".u_") && !name.ends_with(".u_0");
                    if dead {
                        data.iter_mut().for_each(|b| *b = 0);
                    }
                }
            },
            false,
        );
    }
}

#[test]
fn every_method_puts_the_only_useful_blocks_first() {
    let root = tempfile::tempdir().unwrap();
    let dense = root.path().join("dense");
    SyntheticSpec {
        vocab: 256,
        ..Default::default()
    }
    .write(&dense)
    .unwrap();
    let calib = root.path().join("calib.txt");
    std::fs::write(&calib, "calibration text for the sorting test; ".repeat(30)).unwrap();
    let out = root.path().join("packed");
    let opts = common::small_options(calib, 2, 3);
    compress(&dense, &out, &opts).unwrap();
    zero_dead_blocks(&out);
    // Text from the full-stack model: every linear but the live one already
    // matches it at the floor, so the live blocks are the only ones that help.
    let wins = sample(&out, 48, 64);

    let sort = |method| {
        let mut checkpoint = Checkpoint::open(&out).unwrap();
        sort_on_windows(&mut checkpoint, method, &wins, 3, &ProgressBar::hidden())
            .unwrap()
            .0
    };
    let (exact, fast, local) = (
        sort(SortMethod::Exact),
        sort(SortMethod::Fast),
        sort(SortMethod::Local),
    );
    let linears = 14;
    // every method keeps the levels: the live linear leads each level
    for order in [&exact, &fast, &local] {
        assert_eq!(order.order.len(), 2 * linears, "{}", order.method);
        let (first, second) = (&order.order[0], &order.order[linears]);
        assert_eq!(
            *first,
            (LIVE.to_string(), 1),
            "{}: {:?}",
            order.method,
            &order.order[..3]
        );
        assert_eq!(
            *second,
            (LIVE.to_string(), 2),
            "{}: {:?}",
            order.method,
            &order.order[linears..]
        );
    }
    // both wrote a loadable order
    assert!(
        out.join("bitstack_order.json").exists() && out.join("compression_config.json").exists()
    );
}
