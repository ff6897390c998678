//! Shared helpers for Aula's cross-crate tests.
