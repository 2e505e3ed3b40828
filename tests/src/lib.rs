//! Support crate for the integration test binary (`tests/it`).
