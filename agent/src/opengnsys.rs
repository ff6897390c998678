//! OpenGnsys `CloningEngine` compatibility: the request bodies of ogAgent
//! 1.4 (`POST /CloningEngine/<op>`), translated into native job specs.
//!
//! Field names and meanings are OpenGnsys' wire names (see
//! `shared/research/opengnsys.md` §1.4): `dsk` disk number (1-based), `par`
//! partition number (0 = whole disk), `cpt` partition type code, `idi`
//! image id (echoed), `nci` image name, `ipr` repository address, `ifs`
//! software profile (echoed), `ids` action tracking id (echoed), `nfn`
//! function name (must match the route when given), `method` transfer
//! method. Numeric fields may be strings or numbers (`"1"` or `1`); each
//! operation accepts exactly its documented fields and refuses others.

use std::collections::BTreeMap;

use aula_imager::disk::layout::{Loose, OpenGnsysPartition, OpenGnsysSetup};
use serde_json::{Map, Value};

use crate::config::Settings;
use crate::spec::{
    BadRequest, BootOsSpec, CreateSpec, Empty, JobSpec, LayoutJobSpec, Method, PartitionRef,
    RestoreSpec, ScriptSpec,
};

/// The `CloningEngine` operations.
pub const OPS: &[&str] = &[
    "RestaurarImagen",
    "CrearImagen",
    "Configurar",
    "InventarioHardware",
    "InventarioSoftware",
    "EjecutarScript",
    "Apagar",
    "Reiniciar",
    "IniciarSesion",
];

/// Fields each operation accepts: (name, required).
fn fields(op: &str) -> Option<&'static [(&'static str, bool)]> {
    Some(match op {
        "RestaurarImagen" => &[
            ("dsk", true),
            ("par", true),
            ("cpt", false),
            ("ifs", false),
            ("idi", false),
            ("nci", true),
            ("ipr", true),
            ("nfn", false),
            ("method", false),
            ("ids", false),
        ],
        "CrearImagen" => &[
            ("dsk", true),
            ("par", true),
            ("cpt", false),
            ("idi", false),
            ("nci", true),
            ("ipr", true),
            ("nfn", false),
            ("ids", false),
        ],
        "Configurar" => &[
            ("type", true),
            ("disk", false),
            ("cache", false),
            ("cache_size", false),
            ("partition_setup", true),
            ("nfn", false),
            ("ids", false),
        ],
        "InventarioHardware" | "Apagar" | "Reiniciar" => &[("nfn", false), ("ids", false)],
        "InventarioSoftware" => &[("dsk", true), ("par", true), ("nfn", false), ("ids", false)],
        "EjecutarScript" => &[("scp", true), ("nfn", false), ("ids", false)],
        "IniciarSesion" => &[
            ("dsk", false),
            ("par", false),
            ("nfn", false),
            ("ids", false),
        ],
        _ => return None,
    })
}

/// A parsed `CloningEngine` request.
#[derive(Debug, Clone)]
pub struct OgRequest {
    /// The operation (= `nfn`).
    pub op: &'static str,
    /// What to run.
    pub spec: JobSpec,
    /// The scalar request fields as received (strings), echoed in webhooks.
    pub echo: BTreeMap<String, String>,
}

fn scalar(field: &str, v: &Value) -> Result<String, BadRequest> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        _ => Err(BadRequest::field(field, "expected a string or a number")),
    }
}

fn number(field: &str, v: &Value) -> Result<u32, BadRequest> {
    let s = scalar(field, v)?;
    s.trim()
        .parse::<u32>()
        .map_err(|_| BadRequest::field(field, format!("{s:?} is not a number")))
}

fn loose(field: &str, v: &Value) -> Result<Loose, BadRequest> {
    match v {
        Value::String(s) => Ok(Loose::Str(s.clone())),
        Value::Number(n) => n
            .as_u64()
            .map(Loose::Num)
            .ok_or_else(|| BadRequest::field(field, format!("{n} is not a whole number"))),
        Value::Bool(b) => Ok(Loose::Bool(*b)),
        _ => Err(BadRequest::field(field, "expected a string or a number")),
    }
}

fn check_host(field: &str, s: &str) -> Result<String, BadRequest> {
    let t = s.trim();
    let ok = !t.is_empty()
        && t.len() <= 253
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'));
    if ok {
        Ok(t.to_string())
    } else {
        Err(BadRequest::field(
            field,
            format!("{s:?} is not an IP address or host name"),
        ))
    }
}

/// Parse the body of `POST /CloningEngine/<op>`.
pub fn parse(op: &str, body: Value, settings: &Settings) -> Result<OgRequest, BadRequest> {
    let op: &'static str = OPS
        .iter()
        .find(|o| **o == op)
        .copied()
        .ok_or_else(|| BadRequest::body(format!("unknown operation {op:?}")))?;
    let allowed =
        fields(op).ok_or_else(|| BadRequest::body(format!("unknown operation {op:?}")))?;
    let map: Map<String, Value> = match body {
        Value::Object(m) => m,
        Value::Null => Map::new(),
        _ => return Err(BadRequest::body("the body must be a JSON object")),
    };
    for k in map.keys() {
        if !allowed.iter().any(|(f, _)| f == k) {
            let names: Vec<&str> = allowed.iter().map(|(f, _)| *f).collect();
            return Err(BadRequest::field(
                k.clone(),
                format!("unknown field for {op} (accepted: {})", names.join(", ")),
            ));
        }
    }
    for (f, required) in allowed {
        if *required && !map.contains_key(*f) {
            return Err(BadRequest::field(*f, format!("missing (required by {op})")));
        }
    }
    let mut echo = BTreeMap::new();
    for (k, v) in &map {
        if k == "partition_setup" || k == "scp" {
            continue;
        }
        echo.insert(k.clone(), scalar(k, v)?);
    }
    if let Some(nfn) = echo.get("nfn") {
        if nfn != op {
            return Err(BadRequest::field(
                "nfn",
                format!("{nfn:?} does not match the operation {op}"),
            ));
        }
    }
    let get = |f: &str| map.get(f);
    let dsk = |required: bool| -> Result<u32, BadRequest> {
        match get("dsk") {
            Some(v) => {
                let n = number("dsk", v)?;
                if n == 0 {
                    return Err(BadRequest::field("dsk", "disk numbers start at 1"));
                }
                Ok(n)
            }
            None if required => Err(BadRequest::field("dsk", "missing")),
            None => Ok(1),
        }
    };
    let par = || -> Result<Option<u32>, BadRequest> {
        match get("par") {
            Some(v) => Ok(Some(number("par", v)?).filter(|n| *n != 0)),
            None => Ok(None),
        }
    };
    let text = |f: &str| -> Result<String, BadRequest> {
        match get(f) {
            Some(v) => scalar(f, v),
            None => Err(BadRequest::field(f, "missing")),
        }
    };
    let spec = match op {
        "RestaurarImagen" => {
            let method = match get("method") {
                Some(v) => Method::parse_opengnsys(&scalar("method", v)?)
                    .map_err(|m| BadRequest::field("method", m))?,
                None => Method::Unicast,
            };
            let ipr = check_host("ipr", &text("ipr")?)?;
            JobSpec::Restore(RestoreSpec {
                disk: dsk(true)?,
                partition: par()?,
                image: text("nci")?,
                repository: Some(settings.repo_url_for(&ipr)),
                method,
                delta: true,
                allow_http: false,
                offline: false,
            })
        }
        "CrearImagen" => {
            let ipr = check_host("ipr", &text("ipr")?)?;
            JobSpec::Create(CreateSpec {
                disk: dsk(true)?,
                partition: par()?,
                image: text("nci")?,
                repository: Some(settings.repo_url_for(&ipr)),
                description: echo.get("idi").map(|i| format!("OpenGnsys image id {i}")),
                raw: false,
                allow_http: false,
            })
        }
        "Configurar" => {
            let setup = setup(&map)?;
            let disk = setup
                .disk()
                .map_err(|e| BadRequest::field("disk", e.to_string()))?;
            let layout = setup.to_spec().map_err(|e| {
                let msg = e.to_string();
                let field = if msg.contains("table type") {
                    "type"
                } else if msg.contains("cache") {
                    "cache"
                } else {
                    "partition_setup"
                };
                BadRequest::field(field, msg)
            })?;
            JobSpec::Layout(LayoutJobSpec { disk, layout })
        }
        "InventarioHardware" => JobSpec::HardwareInventory(Empty {}),
        "InventarioSoftware" => {
            let partition = par()?.ok_or_else(|| {
                BadRequest::field("par", "a partition number (1, 2, …) is needed")
            })?;
            JobSpec::SoftwareInventory(PartitionRef {
                disk: dsk(true)?,
                partition,
            })
        }
        "EjecutarScript" => JobSpec::Script(ScriptSpec {
            script: text("scp")?,
            timeout_s: None,
        }),
        "Apagar" => JobSpec::Poweroff(Empty {}),
        "Reiniciar" => JobSpec::Reboot(Empty {}),
        "IniciarSesion" => JobSpec::BootOs(BootOsSpec {
            disk: dsk(false)?,
            partition: par()?,
        }),
        _ => return Err(BadRequest::body(format!("unknown operation {op:?}"))),
    };
    spec.check().map_err(|e| rename_field(e, op))?;
    Ok(OgRequest { op, spec, echo })
}

/// Native field names in errors → the OpenGnsys names the client sent.
fn rename_field(mut e: BadRequest, op: &str) -> BadRequest {
    let renamed = match (e.field.as_deref(), op) {
        (Some("disk"), "Configurar") => None,
        (Some("disk"), _) => Some("dsk"),
        (Some("partition"), _) => Some("par"),
        (Some("image"), _) => Some("nci"),
        (Some("repository"), _) => Some("ipr"),
        (Some("script"), _) => Some("scp"),
        _ => None,
    };
    if let Some(r) = renamed {
        e.field = Some(r.to_string());
    }
    e
}

fn setup(map: &Map<String, Value>) -> Result<OpenGnsysSetup, BadRequest> {
    let table_type = match map.get("type") {
        Some(v) => scalar("type", v)?,
        None => return Err(BadRequest::field("type", "missing")),
    };
    let opt = |f: &str| -> Result<Option<Loose>, BadRequest> {
        map.get(f).map(|v| loose(f, v)).transpose()
    };
    let entries = match map.get("partition_setup") {
        Some(Value::Array(a)) => a,
        Some(_) => return Err(BadRequest::field("partition_setup", "must be an array")),
        None => return Err(BadRequest::field("partition_setup", "missing")),
    };
    let mut parts = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let at = |f: &str| format!("partition_setup[{i}].{f}");
        let Value::Object(m) = e else {
            return Err(BadRequest::field(
                format!("partition_setup[{i}]"),
                "must be an object",
            ));
        };
        const KEYS: &[(&str, bool)] = &[
            ("partition", true),
            ("code", true),
            ("filesystem", false),
            ("size", true),
            ("format", false),
        ];
        for k in m.keys() {
            if !KEYS.iter().any(|(f, _)| f == k) {
                return Err(BadRequest::field(
                    at(k),
                    "unknown field (accepted: partition, code, filesystem, size, format)",
                ));
            }
        }
        for (k, req) in KEYS {
            if *req && !m.contains_key(*k) {
                return Err(BadRequest::field(at(k), "missing"));
            }
        }
        let field = |k: &str| -> Result<Loose, BadRequest> {
            let v = m
                .get(k)
                .ok_or_else(|| BadRequest::field(at(k), "missing"))?;
            loose(&at(k), v)
        };
        // Sizes and numbers must be numbers; check here to name the entry.
        for k in ["partition", "size"] {
            let v = field(k)?;
            let ok = match &v {
                Loose::Num(_) => true,
                Loose::Str(s) => s.trim().parse::<u64>().is_ok(),
                Loose::Bool(_) => false,
            };
            if !ok {
                return Err(BadRequest::field(at(k), "is not a number"));
            }
        }
        parts.push(OpenGnsysPartition {
            partition: field("partition")?,
            code: field("code")?,
            filesystem: m
                .get("filesystem")
                .map(|v| scalar(&at("filesystem"), v))
                .transpose()?,
            size: field("size")?,
            format: m
                .get("format")
                .map(|v| loose(&at("format"), v))
                .transpose()?,
        });
    }
    Ok(OpenGnsysSetup {
        table_type,
        disk: opt("disk")?,
        cache: opt("cache")?,
        cache_size: opt("cache_size")?,
        partition_setup: parts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FileConfig, KernelParams, Settings};

    fn settings() -> Settings {
        let f =
            FileConfig::parse("[repository]\nscheme = \"http\"\nport = 9000\n", "t").expect("cfg");
        Settings::new(f, &KernelParams::default()).expect("settings")
    }

    #[test]
    fn the_documented_restore_body_becomes_a_unicast_partition_restore() {
        let body = serde_json::json!({"dsk":"1","par":"2","cpt":"83","ifs":"1","idi":"9d1c","nci":"image-test","ipr":"127.0.0.1","nfn":"RestaurarImagen","method":"unicast","ids":"0"});
        let r = parse("RestaurarImagen", body, &settings()).expect("parse");
        let JobSpec::Restore(s) = &r.spec else {
            panic!("not a restore: {:?}", r.spec)
        };
        assert_eq!((s.disk, s.partition), (1, Some(2)));
        assert_eq!(s.image, "image-test");
        assert_eq!(s.repository.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(s.method, Method::Unicast);
        assert_eq!(r.echo.get("ids").map(String::as_str), Some("0"));
        assert_eq!(r.echo.get("idi").map(String::as_str), Some("9d1c"));
    }

    #[test]
    fn numbers_may_be_numbers_and_errors_name_opengnsys_fields() {
        let ok = serde_json::json!({"dsk":1,"par":2,"nci":"x","ipr":"10.0.0.1"});
        assert!(parse("RestaurarImagen", ok, &settings()).is_ok());
        let cases = [
            (
                serde_json::json!({"dsk":"a","par":"2","nci":"x","ipr":"1.2.3.4"}),
                "dsk",
            ),
            (
                serde_json::json!({"dsk":"1","par":"2","nci":"x","ipr":"1.2.3.4","method":"multicast"}),
                "method",
            ),
            (
                serde_json::json!({"dsk":"1","par":"2","nci":"x","ipr":"1.2.3.4","extra":"1"}),
                "extra",
            ),
            (
                serde_json::json!({"dsk":"1","par":"2","ipr":"1.2.3.4"}),
                "nci",
            ),
            (
                serde_json::json!({"dsk":"1","par":"2","nci":"../x","ipr":"1.2.3.4"}),
                "nci",
            ),
            (
                serde_json::json!({"dsk":"1","par":"2","nci":"x","ipr":"1.2.3.4","nfn":"CrearImagen"}),
                "nfn",
            ),
            (
                serde_json::json!({"dsk":"1","par":[2],"nci":"x","ipr":"1.2.3.4"}),
                "par",
            ),
            (
                serde_json::json!({"dsk":"1","par":"2","nci":"x","ipr":"a b"}),
                "ipr",
            ),
        ];
        for (body, field) in cases {
            let e = parse("RestaurarImagen", body.clone(), &settings()).expect_err("refused");
            assert_eq!(e.field.as_deref(), Some(field), "{body}: {e}");
        }
    }

    #[test]
    fn configurar_takes_the_setup_body_and_names_bad_entries() {
        let body = serde_json::json!({"nfn":"Configurar","ids":"7","type":"MSDOS","disk":"1","cache":"1","cache_size":"0",
            "partition_setup":[
                {"partition":"1","code":"LINUX","filesystem":"EXT4","size":"102400","format":"1"},
                {"partition":"2","code":"CACHE","filesystem":"CACHE","size":"51200","format":"1"}]});
        let r = parse("Configurar", body, &settings()).expect("parse");
        let JobSpec::Layout(l) = &r.spec else {
            panic!("not a layout")
        };
        assert_eq!(l.disk, 1);
        assert_eq!(l.layout.partitions.len(), 2);
        let bad = serde_json::json!({"type":"GPT","partition_setup":[{"partition":"1","code":"LINUX","size":"big"}]});
        let e = parse("Configurar", bad, &settings()).expect_err("size");
        assert_eq!(e.field.as_deref(), Some("partition_setup[0].size"));
        let bad = serde_json::json!({"type":"GPT","partition_setup":[{"partition":"1","code":"LINUX","size":"1","colour":"red"}]});
        let e = parse("Configurar", bad, &settings()).expect_err("colour");
        assert_eq!(e.field.as_deref(), Some("partition_setup[0].colour"));
        let bad = serde_json::json!({"type":"SUN","partition_setup":[{"partition":"1","code":"LINUX","size":"1024"}]});
        let e = parse("Configurar", bad, &settings()).expect_err("type");
        assert_eq!(e.field.as_deref(), Some("type"));
    }
}
