//! The KV-cache path computes what the full recomputation computes.

mod common;

use bitstack_quant::format::checkpoint::BlockCounts;
use bitstack_quant::format::synthetic::SyntheticSpec;
use bitstack_quant::runtime::generate::{generate, SamplingOptions};
use bitstack_quant::runtime::model::{KvCache, Llama};
use candle_core::{Device, Tensor};
use common::relative_error;

#[test]
fn cached_steps_match_full_recomputation() {
    let dir = tempfile::tempdir().unwrap();
    SyntheticSpec {
        heads: 4,
        kv_heads: 2,
        ..Default::default()
    }
    .write(dir.path())
    .unwrap();
    let model = Llama::load(dir.path(), &BlockCounts::all(), &Device::Cpu).unwrap();
    let ids: Vec<u32> = (0..23u32).map(|i| (i * 37 + 5) % 300).collect();
    let full = model
        .forward(&Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).unwrap())
        .unwrap();

    // prompt of 9 tokens, then chunks of 1 and 5 tokens
    let mut cache = KvCache::new(&model);
    let mut at = 0;
    for len in [9, 1, 1, 5, 1, 6] {
        let chunk = Tensor::from_slice(&ids[at..at + len], (1, len), &Device::Cpu).unwrap();
        let got = model.forward_cached(&chunk, &mut cache).unwrap();
        let want = full.narrow(1, at, len).unwrap();
        let e = relative_error(
            &got.flatten_all().unwrap().to_vec1().unwrap(),
            &want.flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert!(e < 1e-5, "positions {at}..{}: {e}", at + len);
        at += len;
        assert_eq!(cache.len(), at);
    }
}

#[test]
fn greedy_generation_follows_the_argmax_and_stops_at_eos() {
    let dir = tempfile::tempdir().unwrap();
    SyntheticSpec::default().write(dir.path()).unwrap();
    let model = Llama::load(dir.path(), &BlockCounts::all(), &Device::Cpu).unwrap();
    let prompt = [3u32, 141, 59, 26];
    let opts = SamplingOptions {
        max_tokens: 12,
        temperature: 0.0,
        seed: 0,
    };
    let g = generate(&model, &prompt, &[], &opts, |_| Ok(())).unwrap();
    assert_eq!(g.tokens.len(), 12);
    // each token is the argmax of a full forward over everything before it
    let mut seq = prompt.to_vec();
    for &t in &g.tokens {
        let x = Tensor::from_slice(&seq, (1, seq.len()), &Device::Cpu).unwrap();
        let logits = model
            .forward(&x)
            .unwrap()
            .get(0)
            .unwrap()
            .get(seq.len() - 1)
            .unwrap();
        assert_eq!(t, logits.argmax(0).unwrap().to_scalar::<u32>().unwrap());
        seq.push(t);
    }
    // stopping: the 4th token declared as EOS ends generation there
    let eos = g.tokens[3];
    let first = g.tokens.iter().position(|&t| t == eos).unwrap();
    let stopped = generate(&model, &prompt, &[eos], &opts, |_| Ok(())).unwrap();
    assert_eq!(stopped.tokens, g.tokens[..=first]);
    // sampling with a seed is reproducible
    let hot = SamplingOptions {
        temperature: 1.0,
        seed: 7,
        ..opts
    };
    let a = generate(&model, &prompt, &[], &hot, |_| Ok(())).unwrap();
    let b = generate(&model, &prompt, &[], &hot, |_| Ok(())).unwrap();
    assert_eq!(a.tokens, b.tokens);
}
