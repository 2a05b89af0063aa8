//! embedroll operator: the EmbeddingRollout controller.
//!
//! The controller itself lands with the operator issue; this crate exists now so the workspace
//! layout is fixed from the start.
