//! Detection of filesystems that have no walker: Linux swap made by the
//! real `mkswap` (label, UUID, size; its map is the header page only).

mod common;

use aula_imager::fs::{detect, used_map, MapOptions};
use common::*;

#[test]
fn swap_is_detected_with_label_and_uuid_and_maps_to_its_header_page() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("swap.img");
    sparse_file(&img, 16 << 20);
    run(
        "mkswap",
        &[
            "-L",
            "lab swap",
            "-U",
            "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
            s(&img),
        ],
    );
    let src = region(&img, 0, None);
    let m = detect(&src).expect("detect").expect("swap");
    assert_eq!(m.fstype, "swap");
    assert_eq!(m.label.as_deref(), Some("lab swap"));
    assert_eq!(
        m.uuid.as_deref(),
        Some("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")
    );
    let blkid = run("blkid", &["-p", "-o", "value", "-s", "UUID", s(&img)]);
    assert_eq!(m.uuid.as_deref(), Some(blkid.trim()));
    assert_eq!(m.fs_size, Some(16 << 20));
    let map = used_map(&src, MapOptions::default())
        .expect("map")
        .expect("swap");
    assert_eq!(map.used.extents().len(), 1);
    assert_eq!(map.used.used_bytes(), 4096);
    // A copy of just the header page is still a valid swap area.
    let copy = dir.path().join("copy.img");
    copy_used(&img, 0, &map.used, &copy);
    let t = run("blkid", &["-p", "-o", "value", "-s", "TYPE", s(&copy)]);
    assert_eq!(t.trim(), "swap");
}
