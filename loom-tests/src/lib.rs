//! Shared helpers for the loom and shuttle models (see `tests/`).
