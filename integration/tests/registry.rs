//! The external quantization registry (integration/upstream, the
//! mistralrs-quant patches) with a trivial method of the test's own: a
//! model whose `quant_method` names a registered factory gets every decoder
//! linear from it, computes what the unquantized model does when the
//! factory loads the weights as they are, and an unregistered name is an
//! error that lists what is accepted.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use mistralrs::{ModelDType, TextModelBuilder};
use mistralrs_quant::{
    register_quant_method, registered_quant_methods, unregister_quant_method, ExternalQuantFactory,
    QuantMethod, QuantMethodConfig, ShardedVarBuilder, UnquantLinear,
};

const METHOD: &str = "plain-test";

/// Loads each linear's stored weight unchanged, and counts the calls.
#[derive(Default)]
struct Plain {
    built: AtomicUsize,
}

impl ExternalQuantFactory for Plain {
    fn linear(
        &self,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        config: &serde_json::Value,
        vb: ShardedVarBuilder,
    ) -> candle_core::Result<Arc<dyn QuantMethod>> {
        // The whole config object reaches the factory, fields of its own included.
        assert_eq!(config["quant_method"], METHOD);
        assert_eq!(config["levels"], serde_json::json!([1, 2, 3]));
        self.built.fetch_add(1, Ordering::SeqCst);
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Arc::new(UnquantLinear::new(
            QuantMethodConfig::Unquantized(candle_nn::Linear::new(weight, bias)),
        )?))
    }
}

/// `dense` under another `config.json` saying `quant_method`, its other
/// files linked.
fn relabelled(dense: &Path, to: &Path, method: &str) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(dense).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "config.json" {
            std::os::unix::fs::symlink(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dense.join("config.json")).unwrap()).unwrap();
    config["quantization_config"] =
        serde_json::json!({"quant_method": method, "levels": [1, 2, 3]});
    std::fs::write(to.join("config.json"), config.to_string()).unwrap();
}

async fn last_logits(dir: &Path) -> Result<Vec<f32>, String> {
    let model = TextModelBuilder::new(dir.to_str().unwrap())
        .with_force_cpu()
        .with_dtype(ModelDType::F32)
        .build()
        .await
        .map_err(|e| format!("{e:#}"))?;
    Ok(common::raw_logits(&model, "Hello there.").await.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registered_method_builds_every_decoder_linear() {
    let dense = common::dense();
    let root = tempfile::tempdir().unwrap();
    let plain = root.path().join("plain");
    relabelled(dense, &plain, METHOD);

    // Not registered: an error naming the method and what is accepted.
    let e = last_logits(&plain).await.unwrap_err();
    assert!(
        e.contains(&format!("Unknown quantization method: {METHOD}")),
        "{e}"
    );
    assert!(e.contains("gptq"), "{e}");

    let factory = Arc::new(Plain::default());
    register_quant_method(METHOD, factory.clone()).unwrap();
    assert!(registered_quant_methods().contains(&METHOD.to_string()));
    let theirs = last_logits(&plain).await.unwrap();
    // SmolLM2: 30 layers of 7 linears; the tied lm_head is the embedding.
    assert_eq!(factory.built.load(Ordering::SeqCst), 30 * 7);
    let want = last_logits(dense).await.unwrap();
    assert_eq!(
        theirs, want,
        "the factory's linears compute the unquantized model"
    );

    // Unregistered again: refused again.
    assert!(unregister_quant_method(METHOD).is_some());
    let e = last_logits(&plain).await.unwrap_err();
    assert!(
        e.contains(&format!("Unknown quantization method: {METHOD}")),
        "{e}"
    );
}
