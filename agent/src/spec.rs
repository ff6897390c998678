//! Job specifications: what a job does, as the native API takes it
//! (`POST /v1/jobs`) and as the OpenGnsys routes translate into.
//!
//! Parsing goes through `serde_path_to_error`, so a 400 names the field at
//! fault (`disk: invalid type: string "x", expected u32`), and every body
//! refuses unknown fields.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use aula_imager::disk::layout::LayoutSpec;

/// A request the agent refuses, naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", field.as_ref().map(|f| format!("{f}: ")).unwrap_or_default())]
pub struct BadRequest {
    /// The offending field (`dsk`, `partition_setup[2].size`), when one is.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl BadRequest {
    /// An error about `field`.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> BadRequest {
        BadRequest {
            field: Some(field.into()),
            message: message.into(),
        }
    }
    /// An error about the body as a whole.
    pub fn body(message: impl Into<String>) -> BadRequest {
        BadRequest {
            field: None,
            message: message.into(),
        }
    }
}

/// Deserialize `T` from a JSON value, naming the failing field.
pub fn from_value<T: DeserializeOwned>(v: serde_json::Value) -> Result<T, BadRequest> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // serde's own message already names unknown / missing fields.
        let field = if path == "." {
            field_in_message(&inner)
        } else {
            Some(path)
        };
        BadRequest {
            field,
            message: inner,
        }
    })
}

fn field_in_message(msg: &str) -> Option<String> {
    for key in ["unknown field `", "missing field `"] {
        if let Some(rest) = msg.split(key).nth(1) {
            return rest.split('`').next().map(str::to_string);
        }
    }
    None
}

/// How an image reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Chunks stream from the repository straight onto the target.
    #[default]
    Unicast,
    /// Chunks go through the CACHE partition: served from it when present,
    /// stored into it after verification.
    UnicastCache,
    /// Chunks come from the other machines restoring the same image as the
    /// repository's swarm coordinator assigns them (and from the
    /// repository), straight onto the target; this machine serves what it
    /// verified to the others.
    Swarm,
}

impl Method {
    /// Parse an OpenGnsys `method` (`ptc`) value.
    pub fn parse_opengnsys(s: &str) -> Result<Method, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "unicast" | "unicast-direct" => Ok(Method::Unicast),
            "unicast-cache" => Ok(Method::UnicastCache),
            "swarm" | "torrent" | "tiptorrent" => Ok(Method::Swarm),
            other => Err(format!(
                "method {other:?} is not supported (supported: unicast, unicast-cache, torrent / tiptorrent / swarm)"
            )),
        }
    }
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Unicast => "unicast",
            Method::UnicastCache => "unicast-cache",
            Method::Swarm => "swarm",
        }
    }
}

fn yes() -> bool {
    true
}

/// Restore an image onto a disk or one of its partitions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreSpec {
    /// Disk number (1-based, OpenGnsys `dsk`).
    pub disk: u32,
    /// Partition number; absent or 0 = the whole disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
    /// Image name, optionally `name@version`.
    pub image: String,
    /// Repository URL (default: the configured one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// `unicast` (default), `unicast-cache` or `swarm`.
    #[serde(default)]
    pub method: Method,
    /// Skip chunks the target already holds (default true).
    #[serde(default = "yes")]
    pub delta: bool,
    /// Accept an `http://` repository although the agent pins the server.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_http: bool,
    /// `unicast-cache` only: take the manifest from the CACHE partition
    /// without asking the repository, even one it never confirmed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub offline: bool,
}

/// Capture a disk or partition as an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSpec {
    /// Disk number.
    pub disk: u32,
    /// Partition number; absent or 0 = the whole disk (a disk image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
    /// Image name.
    pub image: String,
    /// Repository URL (default: the configured one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// Description stored in the manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Image every byte instead of the filesystem's used blocks.
    #[serde(default)]
    pub raw: bool,
    /// Accept an `http://` repository although the agent pins the server.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_http: bool,
}

/// Partition a disk and make filesystems.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayoutJobSpec {
    /// Disk number.
    pub disk: u32,
    /// The layout (`aula_imager::disk::layout` native spec).
    pub layout: LayoutSpec,
}

/// A partition of a disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionRef {
    /// Disk number.
    pub disk: u32,
    /// Partition number.
    pub partition: u32,
}

/// Boot the installed operating system.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootOsSpec {
    /// Disk number (informational: the firmware boots its first boot entry).
    #[serde(default = "one")]
    pub disk: u32,
    /// Partition number (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
}

fn one() -> u32 {
    1
}

/// Run a shell script.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptSpec {
    /// Script text, run by the configured shell (`/bin/sh -c`).
    pub script: String,
    /// Time limit in seconds (at most the configured `jobs.script_timeout_s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
}

/// No parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// What a job does.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum JobSpec {
    /// Restore an image.
    Restore(RestoreSpec),
    /// Create an image.
    Create(CreateSpec),
    /// Partition a disk.
    Layout(LayoutJobSpec),
    /// Hardware inventory.
    HardwareInventory(Empty),
    /// The operating system on a partition.
    SoftwareInventory(PartitionRef),
    /// Run a script.
    Script(ScriptSpec),
    /// Power off.
    Poweroff(Empty),
    /// Reboot.
    Reboot(Empty),
    /// Boot the installed OS (server boot mode `local` once, then reboot).
    BootOs(BootOsSpec),
}

/// Every native op name, for errors and the OpenAPI document.
pub const OPS: &[&str] = &[
    "restore",
    "create",
    "layout",
    "hardware_inventory",
    "software_inventory",
    "script",
    "poweroff",
    "reboot",
    "boot_os",
];

impl JobSpec {
    /// The native op name.
    pub fn op(&self) -> &'static str {
        match self {
            JobSpec::Restore(_) => "restore",
            JobSpec::Create(_) => "create",
            JobSpec::Layout(_) => "layout",
            JobSpec::HardwareInventory(_) => "hardware_inventory",
            JobSpec::SoftwareInventory(_) => "software_inventory",
            JobSpec::Script(_) => "script",
            JobSpec::Poweroff(_) => "poweroff",
            JobSpec::Reboot(_) => "reboot",
            JobSpec::BootOs(_) => "boot_os",
        }
    }

    /// Parse `{"op": …, …}` (without `id`).
    pub fn parse(
        mut map: serde_json::Map<String, serde_json::Value>,
    ) -> Result<JobSpec, BadRequest> {
        let op = match map.remove("op") {
            Some(serde_json::Value::String(s)) => s,
            Some(_) => return Err(BadRequest::field("op", "must be a string")),
            None => {
                return Err(BadRequest::field(
                    "op",
                    format!("missing (one of: {})", OPS.join(", ")),
                ))
            }
        };
        let v = serde_json::Value::Object(map);
        Ok(match op.as_str() {
            "restore" => JobSpec::Restore(from_value(v)?),
            "create" => JobSpec::Create(from_value(v)?),
            "layout" => JobSpec::Layout(from_value(v)?),
            "hardware_inventory" => JobSpec::HardwareInventory(from_value(v)?),
            "software_inventory" => JobSpec::SoftwareInventory(from_value(v)?),
            "script" => JobSpec::Script(from_value(v)?),
            "poweroff" => JobSpec::Poweroff(from_value(v)?),
            "reboot" => JobSpec::Reboot(from_value(v)?),
            "boot_os" => JobSpec::BootOs(from_value(v)?),
            other => {
                return Err(BadRequest::field(
                    "op",
                    format!("unknown op {other:?} (one of: {})", OPS.join(", ")),
                ))
            }
        })
    }

    /// Checks that need no disk access.
    pub fn check(&self) -> Result<(), BadRequest> {
        let disk = |d: u32| {
            if d == 0 {
                Err(BadRequest::field("disk", "disk numbers start at 1"))
            } else {
                Ok(())
            }
        };
        match self {
            JobSpec::Restore(r) => {
                disk(r.disk)?;
                aula_imager::repo::parse_image_ref(&r.image)
                    .map_err(|e| BadRequest::field("image", e.to_string()))?;
                if let Some(u) = &r.repository {
                    check_repo_url(u)?;
                }
                if r.offline && r.method != Method::UnicastCache {
                    return Err(BadRequest::field(
                        "offline",
                        "offline restores read the CACHE partition: use method unicast-cache",
                    ));
                }
            }
            JobSpec::Create(c) => {
                disk(c.disk)?;
                aula_imager::manifest::validate_name(&c.image)
                    .map_err(|e| BadRequest::field("image", e.to_string()))?;
                if let Some(u) = &c.repository {
                    check_repo_url(u)?;
                }
            }
            JobSpec::Layout(l) => disk(l.disk)?,
            JobSpec::SoftwareInventory(p) => {
                disk(p.disk)?;
                if p.partition == 0 {
                    return Err(BadRequest::field(
                        "partition",
                        "partition numbers start at 1",
                    ));
                }
            }
            JobSpec::Script(s) => {
                if s.script.trim().is_empty() {
                    return Err(BadRequest::field("script", "is empty"));
                }
                if s.timeout_s == Some(0) {
                    return Err(BadRequest::field("timeout_s", "must be at least 1"));
                }
            }
            JobSpec::BootOs(b) => disk(b.disk)?,
            JobSpec::HardwareInventory(_) | JobSpec::Poweroff(_) | JobSpec::Reboot(_) => {}
        }
        Ok(())
    }

    /// Normalise `partition: 0` to "whole disk".
    pub fn normalise(&mut self) {
        match self {
            JobSpec::Restore(r) if r.partition == Some(0) => r.partition = None,
            JobSpec::Create(c) if c.partition == Some(0) => c.partition = None,
            JobSpec::BootOs(b) if b.partition == Some(0) => b.partition = None,
            _ => {}
        }
    }
}

fn check_repo_url(u: &str) -> Result<(), BadRequest> {
    if !(u.starts_with("http://") || u.starts_with("https://")) || u.parse::<hyper::Uri>().is_err()
    {
        return Err(BadRequest::field(
            "repository",
            format!("{u:?} is not an http:// or https:// URL"),
        ));
    }
    Ok(())
}

/// A client-supplied job id: 1-128 of `A-Z a-z 0-9 . _ -`.
pub fn check_job_id(id: &str) -> Result<(), BadRequest> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(BadRequest::field(
            "id",
            "use 1-128 characters from A-Z a-z 0-9 . _ -",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: serde_json::Value) -> Result<JobSpec, BadRequest> {
        match v {
            serde_json::Value::Object(m) => JobSpec::parse(m),
            _ => Err(BadRequest::body("not an object")),
        }
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse(serde_json::json!({"op": "restore", "disk": "x", "image": "a"}))
            .expect_err("bad type");
        assert_eq!(e.field.as_deref(), Some("disk"), "{e}");
        let e = parse(serde_json::json!({"op": "restore", "disk": 1})).expect_err("missing");
        assert_eq!(e.field.as_deref(), Some("image"), "{e}");
        let e = parse(serde_json::json!({"op": "reboot", "now": true})).expect_err("unknown");
        assert_eq!(e.field.as_deref(), Some("now"), "{e}");
        let e = parse(serde_json::json!({"op": "dance"})).expect_err("op");
        assert_eq!(e.field.as_deref(), Some("op"), "{e}");
        let e = parse(serde_json::json!({"op": "layout", "disk": 1, "layout": {"table": "gpt", "partitions": [{"number": 1, "type": "linux", "size": "1x"}]}}))
            .expect_err("size");
        assert_eq!(e.field.as_deref(), Some("layout.partitions[0].size"), "{e}");
    }

    #[test]
    fn specs_round_trip_with_their_op_tag() {
        let s = parse(serde_json::json!({"op": "restore", "disk": 1, "partition": 2, "image": "w11@3", "method": "unicast-cache"}))
            .expect("parse");
        let v = serde_json::to_value(&s).expect("ser");
        assert_eq!(v["op"], "restore");
        assert_eq!(v["method"], "unicast-cache");
        assert_eq!(v["delta"], true);
        assert!(s.check().is_ok());
    }

    #[test]
    fn opengnsys_methods_are_mapped_and_others_refused() {
        assert_eq!(Method::parse_opengnsys("UNICAST"), Ok(Method::Unicast));
        assert_eq!(
            Method::parse_opengnsys("unicast-cache"),
            Ok(Method::UnicastCache)
        );
        for m in ["torrent", "TipTorrent", "swarm"] {
            assert_eq!(Method::parse_opengnsys(m), Ok(Method::Swarm), "{m}");
        }
        let e = Method::parse_opengnsys("multicast").expect_err("multicast");
        assert!(e.contains("not supported"), "{e}");
    }
}
