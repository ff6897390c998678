//! `aula-bootserver`: the lab server (boot side and image repository).

#![deny(missing_docs)]

pub mod repository;
pub mod tlsutil;
