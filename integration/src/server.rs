//! The engine and the HTTP server that `mistralrs-bitstack` runs: one
//! mistral.rs engine for a text model, and mistral.rs's router for it behind
//! the [`guard`](crate::guard). In the library so that tests (and hosts that
//! embed the server) build exactly what the binary serves.

use std::sync::Arc;

use anyhow::Result;
use mistralrs::{MistralRs, TextModelBuilder};

use crate::guard::{self, Policy};

/// The engine for `builder`, shared: the chat API and the HTTP server both
/// send to it.
pub async fn engine(builder: TextModelBuilder) -> Result<Arc<MistralRs>> {
    let (pipeline, scheduler, add) =
        mistralrs::model_builder_trait::build_text_pipeline(builder).await?;
    let engine = add.engine_config;
    Ok(mistralrs_core::MistralRsBuilder::new(
        pipeline,
        scheduler,
        engine.throughput_logging_enabled,
        engine.search_embedding_model,
    )
    .with_no_kv_cache(engine.no_kv_cache)
    .with_no_prefix_cache(engine.no_prefix_cache)
    .with_prefix_cache_n(engine.prefix_cache_n)
    .build()
    .await)
}

/// mistral.rs's HTTP router for `runner`, behind the gate of `policy`
/// (which also sets the body limit).
pub async fn router(runner: Arc<MistralRs>, policy: Arc<Policy>) -> Result<axum::Router> {
    let max_body = policy.max_body_bytes;
    Ok(
        mistralrs_server_core::mistralrs_server_router_builder::MistralRsServerRouterBuilder::new()
            .with_mistralrs(runner)
            .with_max_body_limit(max_body)
            .build()
            .await?
            .layer(axum::middleware::from_fn_with_state(policy, guard::guard)),
    )
}
