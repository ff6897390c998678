//! `aula-imager`: the imaging engine of Aula.
//!
//! An image is a JSON manifest plus content-addressed chunks (see
//! `FORMAT.md`). This crate reads sources and writes targets (files, block
//! devices, partitions addressed by byte range), builds used-extent maps from
//! filesystems, and runs the create / restore / verify pipelines against a
//! repository (a local directory or an HTTP service).

#![deny(missing_docs)]

pub mod chunk;
pub mod create;
pub mod device;
pub mod disk;
pub mod disk_image;
pub mod error;
pub mod extent;
pub mod fs;
pub mod image;
mod ioctl;
pub mod legacy;
pub mod manifest;
pub mod pool;
pub mod progress;
pub mod record;
pub mod repo;
pub mod restore;
pub mod swarm;
pub mod table;
pub mod tls;
pub mod verify;

pub use error::{Error, Result};
