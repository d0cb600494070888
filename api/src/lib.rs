//! Request and response types of the hearth session API.
//!
//! The data model follows the Tinker API: a [`Datum`] is a token sequence (`model_input`) plus
//! named per-position arrays (`loss_fn_inputs`) where position `i` predicts token `i + 1` of the
//! full sequence. Losses are **sums over tokens**. Everything here is plain serde data, shared by
//! the engine, the server and the client that cells link against, so it stays dependency-light.
//!
//! Three files, all re-exported at the root: `primitives` (the four primitives' messages and the
//! run configuration), `server` (the session server's own routes under `/v1`) and `home` (finding a
//! running server through its `session.json`).
//!
//! ```
//! use hearth_api::{Datum, LossFnInputs};
//!
//! // "abc" -> predict "bcd", learning only the last two positions.
//! let datum = Datum::new(vec![97, 98, 99], LossFnInputs::cross_entropy(vec![98, 99, 100], vec![0.0, 1.0, 1.0]));
//! let json = serde_json::to_string(&datum).unwrap();
//! assert_eq!(
//!     json,
//!     r#"{"model_input":[97,98,99],"loss_fn_inputs":{"target_tokens":[98,99,100],"weights":[0.0,1.0,1.0]}}"#
//! );
//! ```

mod home;
mod primitives;
mod server;

pub use home::*;
pub use primitives::*;
pub use server::*;
