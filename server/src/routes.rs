//! The server's routes: each protocol's own ([`crate::native`] under `/v1`, [`crate::openai`]'s
//! OpenAI-compatible sampling, [`crate::tinker`] under `/api/v1`) behind one auth layer
//! ([`crate::http::auth`]), the body limit, and one error envelope per protocol for what axum
//! answers itself.

use crate::App;
use axum::http::StatusCode;
use axum::Router;
use std::sync::Arc;

/// All routes, with auth and the body limit.
pub fn router(app: Arc<App>, max_body_bytes: usize) -> Router {
    Router::new()
        .merge(crate::native::router())
        .merge(crate::openai::router())
        .merge(crate::tinker::router())
        .layer(axum::middleware::from_fn_with_state(app.clone(), crate::http::auth))
        // plain text: `error_envelope` wraps it in the envelope of the protocol the path belongs to
        .fallback(|| async { (StatusCode::NOT_FOUND, "no such route; see GET /v1/info and the README for the API") })
        .method_not_allowed_fallback(|| async {
            (StatusCode::METHOD_NOT_ALLOWED, "this route does not take that method")
        })
        .layer(axum::extract::DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::middleware::from_fn(crate::http::error_envelope))
        .with_state(app)
}
