//! The fuzz targets' committed inputs, replayed on the stable toolchain
//! through the same entry points the fuzzer drives (`imager/fuzz`): the
//! seeds made from real tools' outputs (`imager/fuzz/seeds/TARGET/*.zst`,
//! see `imager/fuzz/make-seeds`) and every input that once crashed a target
//! (`imager/fuzz/regressions/TARGET/*`). A panic, an abort or an input that
//! takes more than a second fails the test, naming the input. This is the
//! short fuzzing pass of `scripts/test`; `scripts/fuzz` runs the fuzzer.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

type Target = fn(&[u8]);

const TARGETS: &[(&str, Target)] = &[
    ("fs_ext", aula_imager::fuzzing::fs_ext),
    ("fs_fat", aula_imager::fuzzing::fs_fat),
    ("fs_ntfs", aula_imager::fuzzing::fs_ntfs),
    ("table_gpt", aula_imager::fuzzing::table_gpt),
    ("table_mbr", aula_imager::fuzzing::table_mbr),
    ("partclone", aula_imager::fuzzing::partclone),
    ("lzop", aula_imager::fuzzing::lzop),
    ("manifest", aula_imager::fuzzing::manifest),
    ("dhcp", aula_bootserver::fuzzing::dhcp),
    ("tftp", aula_bootserver::fuzzing::tftp),
    ("range", aula_bootserver::fuzzing::range),
    ("opengnsys", aula_agent::fuzzing::opengnsys),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../imager/fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| p.is_file());
    v.sort();
    v
}

fn replay(target: &str, f: Target, input: &Path, data: &[u8]) {
    let t = Instant::now();
    if let Err(p) = std::panic::catch_unwind(|| f(data)) {
        let why = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        panic!("{target}: {} crashes it: {why}", input.display());
    }
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "{target}: {} took {took:?}",
        input.display()
    );
}

#[test]
fn every_committed_seed_and_regression_input_runs_through_its_target() {
    let root = fuzz_dir();
    let mut seeds_seen = 0;
    for (name, f) in TARGETS {
        let seeds = files(&root.join("seeds").join(name));
        assert!(
            !seeds.is_empty(),
            "no seeds for {name}: run imager/fuzz/make-seeds"
        );
        for s in &seeds {
            let z = std::fs::read(s).expect("seed");
            let data = zstd::decode_all(&z[..]).expect("seed is zstd");
            replay(name, *f, s, &data);
            seeds_seen += 1;
        }
        for r in files(&root.join("regressions").join(name)) {
            let data = std::fs::read(&r).expect("regression input");
            replay(name, *f, &r, &data);
        }
    }
    assert!(seeds_seen >= TARGETS.len());
}

#[test]
fn every_fuzz_target_has_an_entry_here() {
    let dir = fuzz_dir().join("fuzz_targets");
    let mut on_disk: Vec<String> = files(&dir)
        .iter()
        .filter_map(|p| Some(p.file_stem()?.to_str()?.to_string()))
        .collect();
    on_disk.sort();
    let mut here: Vec<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    here.sort();
    assert_eq!(on_disk, here);
}
