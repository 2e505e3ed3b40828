//! The one integration-test binary: end-to-end checks across crates, with
//! real processes, files and sockets.
