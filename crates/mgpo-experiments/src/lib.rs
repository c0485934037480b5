//! Work in progress (issue 6).
